"""Device profiles (one TOML each) and the sizing model."""
