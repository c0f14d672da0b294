"""Stream text from an edgeseq bundle with onnxruntime-genai: the loop an app writes.

    pip install onnxruntime-genai
    python examples/genai_stream.py BUNDLE "The state of" --tokens 200

onnxruntime-genai loads the bundle directory as it is (genai_config.json, the decoder
graph, weights.data, tokenizer.json) and keeps the recurrent state itself; the C, C++,
C#, Java and Objective-C APIs take the same directory and run the same loop.
"""

import argparse
import sys

import onnxruntime_genai as og


def stream(bundle: str, prompt: str, tokens: int, greedy: bool = False):
    model = og.Model(bundle)
    tokenizer = og.Tokenizer(model)
    text = tokenizer.create_stream()  # turns ids into text as they come, whole characters only
    ids = list(tokenizer.encode(prompt))
    if tokenizer.bos_token_id >= 0 and ids[:1] != [tokenizer.bos_token_id]:
        ids.insert(0, tokenizer.bos_token_id)  # a prompt starts with BOS, as the model was trained
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=not greedy, top_k=40, temperature=0.8, max_length=len(ids) + tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
        yield text.decode(generator.get_next_tokens()[0])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Stream text from a bundle with onnxruntime-genai.")
    ap.add_argument("bundle")
    ap.add_argument("prompt")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--greedy", action="store_true")
    args = ap.parse_args()
    sys.stdout.write(args.prompt)
    for piece in stream(args.bundle, args.prompt, args.tokens, args.greedy):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
