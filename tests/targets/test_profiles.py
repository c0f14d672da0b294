"""Device profiles: every shipped TOML loads with the published figures, a user's own file
loads by path, and every mistake in a file is one line naming the file and the line or key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgeseq.choices import FLAVORS, INT8_PRESETS, PRECISIONS, RUNTIMES
from edgeseq.cli import main
from edgeseq.errors import EdgeseqError
from edgeseq.targets import (
    PROFILES,
    ProfileError,
    SizeError,
    Target,
    UnknownTargetError,
    all_targets,
    get_target,
    known_targets,
    load_profile,
    parse_bytes,
)

GiB = 2**30
JETSONS = ["jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb"]
ALIASES = {
    "jetson": "jetson-orin-nano-8gb",
    "orin-nano": "jetson-orin-nano-8gb",
    "orin-nx": "jetson-orin-nx-16gb",
    "agx-orin": "jetson-agx-orin-64gb",
    "rpi5": "raspberry-pi-5",
    "pi5": "raspberry-pi-5",
    "android": "android-arm64",
    "ios": "ios-arm64",
    "x86": "x86-64-cpu",
    "cpu": "x86-64-cpu",
    "cuda": "cuda-desktop",
}
BANDWIDTH_GBS = {  # published peak DRAM bandwidth, and how far a profile may round it
    "jetson-orin-nano-8gb": (68.0, 0.0),
    "jetson-orin-nx-16gb": (102.4, 0.0),
    "jetson-agx-orin-64gb": (204.8, 0.0),
    "raspberry-pi-5": (17.0, 0.1),  # LPDDR4X-4267 x 32 bit = 17.07
    "android-arm64": (77.0, 0.3),  # LPDDR5X-9600 x 64 bit = 76.8
    "ios-arm64": (51.0, 0.3),  # LPDDR5-6400 x 64 bit = 51.2
}
DEFAULT_PRECISION = {
    **dict.fromkeys([*JETSONS, "cuda-desktop"], "fp16"),
    **dict.fromkeys(["raspberry-pi-5", "android-arm64", "ios-arm64"], "int8"),
    "x86-64-cpu": "fp32",
}
TENSORRT_NOTE = "Bundles carry portable graphs (any TensorRT 10); on JetPack 7 (TensorRT 10.9+) --flavor tensorrt adds"

# A user's profile; line numbers matter to the malformed-TOML tests.
VALID = """\
name = "my-board"
aliases = ["board"]

[memory]
available = "2 GiB"
bandwidth_gbs = 25.6

[compute]
fp16_tflops = 1.0
int8_tops = 4.0
threads = 4

[runtime]
name = "onnxruntime"
min_version = "1.20.0"
execution_providers = ["XNNPACKExecutionProvider", "CPUExecutionProvider"]
precisions = ["fp32", "int8"]
default_precision = "int8"
flavors = ["portable"]

[sizing]
efficiency = 0.5
"""


def write(tmp_path: Path, text: str, name: str = "my.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def profile_error(path: Path) -> str:
    """Loading fails with exactly ``ProfileError``, one line naming the file."""
    with pytest.raises(ProfileError) as excinfo:
        load_profile(path)
    assert type(excinfo.value) is ProfileError
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


# ---- shipped profiles ------------------------------------------------------------------
def test_the_shipped_profiles_are_the_documented_devices():
    assert set(known_targets()) == set(ALIASES.values())
    assert [t.name for t in all_targets()] == known_targets()
    assert sorted(p.stem for p in PROFILES.glob("*.toml")) == sorted(known_targets())


@pytest.mark.parametrize("target", all_targets(), ids=lambda t: t.name)
def test_every_shipped_profile_is_sane(target: Target):
    assert Path(target.path).name == f"{target.name}.toml" and Path(target.path).is_file()
    assert 1 * GiB <= target.memory_bytes <= 48 * GiB
    assert target.bandwidth_gbs >= 10 and 0 < target.efficiency <= 1
    assert 0 < target.fp16_tflops <= target.int8_tops  # int8 is at least as fast as fp16 everywhere shipped
    assert target.runtime in RUNTIMES and target.threads >= 1
    assert target.int8_preset in INT8_PRESETS  # the quantizer has settings for it
    assert set(target.precisions) == set(PRECISIONS) and target.default_precision == DEFAULT_PRECISION[target.name]
    assert "portable" in target.flavors and set(target.flavors) <= set(FLAVORS)
    assert all(ep.endswith("ExecutionProvider") for ep in target.execution_providers)
    assert target.execution_providers[-1] == "CPUExecutionProvider"  # the fallback that always exists
    assert target.description and "estimate" in target.sources
    shipped = dataclasses.asdict(target) | {"path": f"edgeseq.targets/profiles/{target.name}.toml"}  # no local path
    assert target.to_dict() == shipped and set(target.to_dict()) == {
        f.name for f in dataclasses.fields(Target)
    }
    json.dumps(target.to_dict())  # goes into a bundle's manifest


@pytest.mark.parametrize("name", JETSONS)
def test_jetsons_run_tensorrt_10_3_on_compute_capability_8_7(name):
    target = get_target(name)
    assert target.compute_capability == "8.7" and target.runtime == "tensorrt" and target.min_runtime_version == "10.3"
    assert target.execution_providers[0] == "TensorrtExecutionProvider"
    assert target.flavors == ("portable",) and target.note.startswith(TENSORRT_NOTE)
    assert "TensorRT 10.16" in target.sources and "CUDA 13" in target.sources


@pytest.mark.parametrize("name", BANDWIDTH_GBS)
def test_bandwidth_is_the_published_figure(name):
    published, slack = BANDWIDTH_GBS[name]
    assert abs(get_target(name).bandwidth_gbs - published) <= slack


def test_device_facts():
    nano = get_target("jetson-orin-nano-8gb")
    assert "102" in nano.sources and "102" in nano.note  # Super mode
    assert nano.memory_bytes == 4 * GiB
    assert get_target("raspberry-pi-5").memory_bytes == 3 * GiB and "8 GB" in get_target("pi5").description
    assert get_target("android").memory_bytes == get_target("ios").memory_bytes == int(1.5 * GiB)
    assert get_target("x86").memory_bytes == 8 * GiB and get_target("x86").flavors == ("contrib", "portable")
    assert get_target("cuda").compute_capability == "8.9"
    for name in ("raspberry-pi-5", "android-arm64", "ios-arm64", "x86-64-cpu"):
        assert get_target(name).compute_capability is None and get_target(name).runtime == "onnxruntime"


@pytest.mark.parametrize("alias, name", ALIASES.items())
def test_aliases_resolve(alias, name):
    assert get_target(alias).name == name
    assert get_target(name) is get_target(alias)


def test_no_alias_is_taken_twice():
    names = [n for t in all_targets() for n in (t.name, *t.aliases)]
    assert len(names) == len(set(names))


# ---- a user's own profile --------------------------------------------------------------
def test_a_user_profile_loads_by_path(tmp_path):
    path = write(tmp_path, VALID)
    target = get_target(str(path))
    assert target == get_target(path) == load_profile(path)
    assert target.name == "my-board" and target.aliases == ("board",) and target.path == str(path)
    assert target.memory_bytes == 2 * GiB and target.bandwidth_gbs == 25.6 and isinstance(target.bandwidth_gbs, float)
    assert target.precisions == ("fp32", "int8") and target.flavors == ("portable",)
    # optional keys take their defaults
    assert (target.compute_capability, target.note, target.description, target.sources) == (None, "", "", "")


def test_a_user_profile_without_the_toml_suffix_loads_if_it_exists(tmp_path):
    path = write(tmp_path, VALID, name="board-profile")
    assert get_target(str(path)).name == "my-board"


def test_a_shipped_profile_copied_by_a_user_loads_the_same(tmp_path):
    original = get_target("jetson")
    copy = write(tmp_path, Path(original.path).read_text())
    assert dataclasses.replace(get_target(str(copy)), path=original.path) == original


# ---- every mistake in a file -----------------------------------------------------------
@pytest.mark.parametrize(
    "line, bad, reason",
    [
        (5, 'available "2 GiB"', "Expected '=' after a key"),
        (10, "int8_tops = ", "Invalid value"),
        (1, 'name = "my-board', "Illegal character"),
    ],
)
def test_malformed_toml_names_the_file_and_line(tmp_path, line, bad, reason):
    lines = VALID.splitlines()
    lines[line - 1] = bad
    path = write(tmp_path, "\n".join(lines) + "\n")
    message = profile_error(path)
    assert message.startswith(f"{path}: line {line}: invalid TOML (") and reason in message
    assert message.endswith("fix the file")


@pytest.mark.parametrize(
    "old, new, words",
    [
        ("available =", "availble =", "unknown key 'memory.availble' (did you mean 'memory.available'?)"),
        ("[memory]\n", "available = 1\n[memory]\n", "unknown key 'available' (did you mean 'memory.available'?)"),
        ("[sizing]", "[sizng]", "unknown key 'sizng.efficiency' (did you mean 'sizing.efficiency'?)"),
        ('flavors = ["portable"]\n', "", "missing key 'runtime.flavors'"),
        ("efficiency = 0.5\n", "", "missing key 'sizing.efficiency'"),
        ('name = "my-board"\n', "", "missing key 'name'"),
        ("bandwidth_gbs = 25.6", 'bandwidth_gbs = "fast"', "memory.bandwidth_gbs = 'fast': expected a positive number"),
        ("bandwidth_gbs = 25.6", "bandwidth_gbs = 0", "memory.bandwidth_gbs = 0: expected a positive number"),
        ('available = "2 GiB"', 'available = "0 GiB"', "memory.available = '0 GiB': expected a positive size"),
        ('available = "2 GiB"', "available = -1", "memory.available = -1: expected a positive size"),
        ('available = "2 GiB"', 'available = "2 gigs"', "memory.available = '2 gigs': expected a positive size"),
        ("efficiency = 0.5", "efficiency = 0", "sizing.efficiency = 0: expected a fraction in (0, 1]"),
        ("efficiency = 0.5", "efficiency = 1.5", "sizing.efficiency = 1.5: expected a fraction in (0, 1]"),
        ("efficiency = 0.5", "efficiency = true", "sizing.efficiency = True: expected a fraction"),
        ("threads = 4", "threads = 0", "compute.threads = 0: expected a whole number >= 1"),
        ("threads = 4", "threads = 2.5", "compute.threads = 2.5: expected a whole number >= 1"),
        (
            "threads = 4",
            "threads = 4\ncapability = 8.7",
            "compute.capability = 8.7: expected a CUDA compute capability",
        ),
        ('"fp32", "int8"]', '"fp32", "fp8"]', "runtime.precisions = ['fp32', 'fp8']: expected a list drawn from fp32"),
        ('"fp32", "int8"]', '"fp32", "fp32"]', "runtime.precisions = ['fp32', 'fp32']: expected a list"),
        ('default_precision = "int8"', 'default_precision = "int4"', "not in runtime.precisions ['fp32', 'int8']"),
        ('["portable"]', '["tflite"]', "runtime.flavors = ['tflite']: expected a list drawn from portable, opset27"),
        ('["portable"]', "[]", "runtime.flavors = []: expected a list"),
        ('name = "onnxruntime"', 'name = "tflite"', "runtime.name = 'tflite': expected one of onnxruntime, tensorrt"),
        (
            '"XNNPACKExecutionProvider"',
            '"XNNPACK"',
            "runtime.execution_providers = ['XNNPACK', 'CPUExecutionProvider']",
        ),
        ('min_version = "1.20.0"', "min_version = 1.2", "runtime.min_version = 1.2: expected a version"),
    ],
)
def test_a_bad_key_or_value_names_the_file_key_and_what_is_expected(tmp_path, old, new, words):
    assert old in VALID
    message = profile_error(write(tmp_path, VALID.replace(old, new, 1)))
    assert words in message
    assert message.endswith(("fix the file", "add it", "pick one of them"))


def test_a_missing_file_is_said_so(tmp_path):
    path = tmp_path / "nope.toml"
    assert "no such profile file" in profile_error(path)
    with pytest.raises(ProfileError, match="no such profile file"):
        get_target(str(path))


def test_a_file_that_is_not_utf8_is_said_so(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(VALID.replace("my-board", "m\xe9-board").encode("latin-1"))
    assert "not UTF-8" in profile_error(path)


def test_an_unknown_target_name_lists_the_known_ones_and_the_nearest():
    with pytest.raises(UnknownTargetError) as excinfo:
        get_target("jetsn")
    message = str(excinfo.value)
    assert "\n" not in message and "unknown target 'jetsn' (did you mean jetson?)" in message
    assert all(name in message for name in known_targets())
    with pytest.raises(UnknownTargetError, match="did you mean raspberry-pi-5"):
        get_target("raspberry-pi5")


# ---- sizes -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, size",
    [
        ("4GiB", 4 * GiB),
        ("4 GiB", 4 * GiB),
        ("4 gib", 4 * GiB),
        ("512 MB", 512 * 10**6),
        ("512MiB", 512 * 2**20),
        ("3.5 GB", 3_500_000_000),
        ("1.5 GiB", 3 * GiB // 2),
        ("64 KiB", 65536),
        ("1 TB", 10**12),
        ("4096", 4096),
        ("  4096 B ", 4096),
        (4096, 4096),
    ],
)
def test_parse_bytes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize(
    "text", ["", "GiB", "4 GB GB", "four GiB", "4 gigs", "-1 GiB", "0", "0 MB", "4,5 GB", 0, -5, 4.5, True]
)
def test_parse_bytes_refuses_what_is_not_a_size(text):
    with pytest.raises(SizeError) as excinfo:
        parse_bytes(text)
    assert isinstance(excinfo.value, EdgeseqError) and "\n" not in str(excinfo.value)


# ---- the CLI ---------------------------------------------------------------------------
def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200"})


def assert_user_error(result: Result, *, contains: str) -> None:
    """Non-zero exit, nothing on stdout, one 'error: ...' line on stderr, no traceback."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], result.stderr


def test_cli_lists_every_target():
    result = cli("targets")
    assert result.exit_code == 0, result.output
    for target in all_targets():
        assert target.name in result.stdout
    assert "fp16*" in result.stdout and "int8*" in result.stdout and "8.7" in result.stdout


def test_cli_json_is_the_profiles():
    result = cli("targets", "--json")
    assert result.exit_code == 0 and result.stderr == "", result.output
    doc = json.loads(result.stdout)
    assert doc == {"targets": [json.loads(json.dumps(t.to_dict())) for t in all_targets()]}
    assert all(t["int8_preset"] for t in doc["targets"])


def test_cli_shows_one_profile_by_alias_or_path(tmp_path):
    result = cli("targets", "jetson")
    assert result.exit_code == 0 and "jetson-orin-nano-8gb" in result.stdout and "sources" in result.stdout
    path = write(tmp_path, VALID)
    doc = json.loads(cli("targets", str(path), "--json").stdout)
    assert [t["name"] for t in doc["targets"]] == ["my-board"] and doc["targets"][0]["path"] == str(path)


def test_cli_bad_profile_is_one_line(tmp_path):
    path = write(tmp_path, VALID.replace("int8_tops = 4.0", "int8_tops 4.0"))
    assert_user_error(cli("targets", str(path)), contains=f"{path}: line 10: invalid TOML")
    assert_user_error(cli("targets", "jetsn"), contains="did you mean jetson?")
    assert_user_error(cli("targets", str(tmp_path / "nope.toml")), contains="no such profile file")
