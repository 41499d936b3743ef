"""Hearth against llama.cpp on the same model, same machine, same run (issue 16's yardstick).

Builds the random 0.92B Llama of issue 16 (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP
5632, vocab 49152, untied head) as a Hugging Face directory (or takes --model DIR), writes it as
GGUF (F16, with the `gguf` package; q/k rows permuted as llama.cpp's converter does), quantizes it
to Q8_0 and Q4_0 with llama.cpp's own quantizer (through llama-cpp-python), then, alternating the
engines round by round at each thread count, measures:

- decode tokens/s at batch 1 after a 128-token prompt (median per token), and
- prefill tokens/s of that 128-token prompt,

at matching bits per weight: Hearth int8 against Q8_0, int4 in groups of 64 against Q4_0 (both 4.5
bits) and int4 in groups of 32 against Q4_1 (both 5.0 bits), with the ratio and each side's weight
bytes read per decoded token against the read bandwidth measured in the same run.

Needs the optional `bench` extra (`pip install -e '.[bench]'`: llama-cpp-python compiles
llama.cpp, about 10 minutes on 2 cores, and gguf). The test suite never needs it. On CPUs with AMX
(Sapphire Rapids and later) llama.cpp 0.3.36 built natively dies in its AMX matmul (a general
protection fault at `ldtilecfg`, measured here); the script refuses such a build and says how to
build llama.cpp without AMX (its AVX-512 VNNI and repacked Q4_0 paths, its fastest that run).

    python benchmarks/bench_vs_llamacpp.py [--threads 1 2] [--rounds 2] [--tokens 32] [--model DIR]
                                           [--work DIR]  (keeps the GGUF files for the next run)
    python benchmarks/bench_vs_llamacpp.py --quality   (the demo model's perplexity at int8 and int4)
    python benchmarks/bench_vs_llamacpp.py --breakdown --model DIR   (Hearth's decode time: block step / LM head / rest)
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shard.generate import generate_local  # noqa: E402
from shard.pipeline import LocalPipeline  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402

PROMPT_TOKENS = 128
# (Hearth quantization, int4 group size, llama.cpp type) at matching bits per weight: int8 and Q8_0
# 8 + 16/32 (one scale per 32 weights in Q8_0, per row in int8); int4 g64 and Q4_0 4.5 (one fp16
# scale per 32 in Q4_0; a bf16 scale and zero per 64 in ours); int4 g32 and Q4_1 5.0 (scale and min).
PAIRS = (("int8", 32, "Q8_0"), ("int4", 64, "Q4_0"), ("int4", 32, "Q4_1"))
FTYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def build_model(path: Path, hidden: int = 2048, layers: int = 16) -> Path:
    """Issue 16's random Llama (hidden 2048, 16 layers: 0.92B), saved in fp32; smaller for a quick run."""
    import transformers

    torch.manual_seed(0)
    heads = hidden // 64
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=2048,
        tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02)
    model.save_pretrained(path)
    return path


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows into llama.cpp's interleaved order (its converter's `permute`)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model_dir: Path, out: Path) -> Path:
    """The checkpoint as an F16 GGUF llama.cpp loads (a placeholder SentencePiece vocabulary: the
    benchmark feeds token ids, never text)."""
    import json

    import gguf
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads, vocab = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("hearth-bench")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(FTYPES["F16"])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "np") as tensors:
            for name in tensors.keys():
                array = tensors.get_tensor(name)
                if name.startswith("model.layers."):
                    index, rest = name[len("model.layers."):].split(".", 1)
                    part = rest.rsplit(".", 1)[0]
                    if part == "self_attn.q_proj":
                        array = _permute(array, heads)
                    elif part == "self_attn.k_proj":
                        array = _permute(array, kv_heads)
                    target = f"blk.{index}.{block[part]}.weight"
                else:
                    target = names[name]
                writer.add_tensor(target, array.astype(np.float32 if array.ndim == 1 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def quantize(f16: Path, kind: str) -> Path:
    import llama_cpp

    out = f16.with_name(f"model-{kind}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    status = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {f16} to {kind} (status {status})")
    return out


def prompt_ids(vocab: int) -> list[int]:
    return torch.randint(259, vocab, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()


AMX_OFF = ("CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
           "-DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
           "-DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF\" "
           "pip install --no-deps --force-reinstall --no-cache-dir llama-cpp-python==0.3.36")


def check_llamacpp() -> None:
    """Refuse a llama.cpp build that uses AMX: it crashes the process in its first matmul here."""
    import llama_cpp

    if "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode():
        sys.exit("llama-cpp-python was built with AMX, whose matmul crashes llama.cpp 0.3.36 on this CPU "
                 f"(a general protection fault); rebuild it without AMX:\n  {AMX_OFF}")


def llamacpp_run(model: Path, threads: int, tokens: int, prompt: list[int]) -> tuple[float, list[float]]:
    """(prefill seconds of the prompt, seconds per decoded token) through llama-cpp-python."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                          n_batch=PROMPT_TOKENS, verbose=False)
    try:
        llm.eval(prompt[:8])  # warm-up, as Hearth gets
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - started
        steps = []
        for i in range(tokens):  # a decode step costs the same whatever the token: feed the prompt's again
            started = time.perf_counter()
            llm.eval([prompt[i % len(prompt)]])
            steps.append(time.perf_counter() - started)
        return prefill, steps
    finally:
        llm.close()


def hearth_run(pipeline: LocalPipeline, tokens: int, prompt: list[int]) -> tuple[float, list[float]]:
    generate_local(pipeline, prompt[:8], SamplingParams(max_new_tokens=2))  # warm-up
    result = generate_local(pipeline, prompt, SamplingParams(max_new_tokens=tokens + 1))
    return result.timings[0], result.timings[1:]


def read_bandwidth() -> float:
    """GB/s of a sum over 1 GiB (the read-only pattern of weights)."""
    data = torch.ones(1 << 28)
    data.sum()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - started)
    return data.numel() * 4 / min(times) / 1e9


def weight_bytes(path: Path) -> int:
    """Bytes read per decoded token: every tensor but the embedding table."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")


def hearth_bytes(pipeline: LocalPipeline) -> int:
    spans = sum(sum(b.numel() * b.element_size() for b in span.buffers()) +
                sum(p.numel() * p.element_size() for p in span.parameters()) for span in pipeline.spans)
    head = pipeline.head
    lm = sum(b.numel() * b.element_size() for n, b in head.named_buffers() if "embed" not in n)
    lm += sum(p.numel() * p.element_size() for n, p in head.named_parameters() if "embed" not in n)
    return spans + lm


def demo_quality() -> None:
    """Held-out perplexity of the bundled demo model (trained, so its tokens mean something) at
    int8 and int4 as `hearth run` quantizes it (blocks and LM head, the kernels this machine runs),
    against fp32 (issue 16's bounds: +0.5% and +3%), and the share of positions whose top-1 token
    equals fp32's. Windows of 512 every 256 tokens, as tools/eval_demo_model.py scores them."""
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tools"))
    import eval_demo_model as demo

    from shard import qkernels

    model_dir = repo / "node" / "demo_model"
    stream, fp32, tops = demo.held_out_stream(model_dir), LocalPipeline.load(model_dir), []

    def fp32_logits(ids: torch.Tensor) -> torch.Tensor:
        logits = demo.pipeline_logits(fp32, ids)
        tops.append(logits.argmax(-1))
        return logits

    base = demo.score("fp32", fp32_logits, stream, 512, 256).perplexity
    print(f"demo model, held-out perplexity ({len(stream):,} tokens): fp32 {base:.3f}; kernels: "
          f"{qkernels.describe()}")
    for quant, group in (("int8", 32), ("int4", 64), ("int4", 32)):
        pipeline = LocalPipeline.load(model_dir, quant=quant, head_quant=quant, group_size=group)
        expected, label = iter(tops), quant if quant == "int8" else f"{quant} g{group}"
        agree = total = 0

        def logits_of(ids: torch.Tensor) -> torch.Tensor:
            nonlocal agree, total
            logits, top = demo.pipeline_logits(pipeline, ids), next(expected)
            agree, total = agree + int((logits.argmax(-1) == top).sum()), total + top.numel()
            return logits

        ppl = demo.score(quant, logits_of, stream, 512, 256).perplexity
        print(f"  {label}: perplexity {ppl:.3f} ({100 * (ppl / base - 1):+.2f}% vs fp32), top-1 token "
              f"equal to fp32's at {100 * agree / total:.2f}% of positions", flush=True)


def breakdown(model_dir: Path, threads: list[int], tokens: int) -> None:
    """Where a Hearth decode step goes (no llama.cpp): per token, the time inside the compiled step
    of the blocks (shard.block_step: their matmuls, attention and the rest, in one call), inside the
    other compiled quantized matmuls (the LM head; a block's where the step cannot run), and the
    rest (embedding, Python and torch dispatch), for each pair's quantization."""
    from shard import block_step, qkernels

    spent = {"step": [0.0, 0], "matmuls": [0.0, 0]}

    def timed(function, into):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                into[0] += time.perf_counter() - started
                into[1] += 1
        return run

    block_step.step = timed(block_step.step, spent["step"])
    for cls in (qkernels.Int4Weights, qkernels.Int8Weights):
        cls.linear = timed(cls.linear, spent["matmuls"])
    import json

    prompt = prompt_ids(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    for count in threads:
        torch.set_num_threads(count)
        for quant, group, _ in PAIRS:
            pipeline = LocalPipeline.load(model_dir, quant=quant, head_quant=quant, group_size=group)
            pipeline.start(1, PROMPT_TOKENS + tokens + 8)
            with torch.inference_mode():
                pipeline.forward(torch.tensor([prompt]))
                for i in range(4):  # warm-up
                    pipeline.forward(torch.tensor([[prompt[i]]]))
                for into in spent.values():
                    into[:] = [0.0, 0]
                steps = []
                for i in range(tokens):  # one decode step each: the blocks and the LM head
                    started = time.perf_counter()
                    pipeline.forward(torch.tensor([[prompt[i]]]))
                    steps.append(time.perf_counter() - started)
            mean = statistics.fmean(steps)
            (step_s, step_calls), (matmul_s, matmul_calls) = spent["step"], spent["matmuls"]
            label = quant if quant == "int8" else f"{quant} g{group}"
            print(f"threads {count} {label:<9} decode {statistics.median(steps) * 1e3:6.1f} ms/token median, "
                  f"{mean * 1e3:6.1f} mean: compiled block step {step_s / tokens * 1e3:5.1f} ms ({step_calls // tokens} "
                  f"calls), other quantized matmuls {matmul_s / tokens * 1e3:5.1f} ms ({matmul_calls // tokens} calls), "
                  f"the rest {(mean - (step_s + matmul_s) / tokens) * 1e3:5.1f} ms", flush=True)
            del pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Llama Hugging Face directory (default: build issue 16's model)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--breakdown", action="store_true", help="only Hearth: time per decoded token in "
                        "the compiled block step, the other quantized matmuls and the rest (needs --model; no llama.cpp)")
    parser.add_argument("--quality", action="store_true", help="only the demo model's perplexity and "
                        "top-1 agreement at int8 and int4 against fp32 (seconds; needs no llama.cpp)")
    parser.add_argument("--work", type=Path, help="keep the model and its GGUF files here and reuse "
                        "them on later runs (default: a temporary directory)")
    args = parser.parse_args()
    if args.quality:
        demo_quality()
        return
    if args.breakdown:
        if args.model is None:
            parser.error("--breakdown needs --model DIR")
        breakdown(args.model, args.threads, args.tokens)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = args.model or work / "model"
        if not (model_dir / "config.json").exists():
            build_model(model_dir)
        source, stamp = work / "gguf-source.txt", f"{model_dir.resolve()} {(model_dir / 'config.json').stat().st_mtime_ns}"
        if not source.exists() or source.read_text() != stamp:  # GGUF files of another model: redo
            for old in work.glob("model-*.gguf"):
                old.unlink()
        f16 = work / "model-F16.gguf"
        if not f16.exists():
            write_gguf(model_dir, f16)
        ggufs = {kind: work / f"model-{kind}.gguf" for _, _, kind in PAIRS}
        for kind, path in ggufs.items():
            if not path.exists():
                quantize(f16, kind)
        source.write_text(stamp)
        import json

        check_llamacpp()
        prompt = prompt_ids(json.loads((model_dir / "config.json").read_text())["vocab_size"])
        bandwidth = read_bandwidth()
        print(f"read bandwidth {bandwidth:.1f} GB/s; batch 1, {PROMPT_TOKENS}-token prompt, "
              f"{args.rounds} rounds x {args.tokens} tokens, engines alternating")
        print(f"{'threads':>7} {'pair':<18}{'decode tok/s':>24}{'ratio':>7}{'prefill tok/s':>24}{'ratio':>7}"
              f"{'GB/s read (ours / theirs)':>28}")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for quant, group, kind in PAIRS:
                pipeline = LocalPipeline.load(model_dir, quant=quant, head_quant=quant, group_size=group)
                label = quant if quant == "int8" else f"{quant} g{group}"
                ours_bytes, theirs_bytes = hearth_bytes(pipeline), weight_bytes(ggufs[kind])
                decode, prefill = {"ours": [], "theirs": []}, {"ours": [], "theirs": []}
                for _ in range(args.rounds):
                    for side in ("theirs", "ours"):
                        pre, steps = (llamacpp_run(ggufs[kind], threads, args.tokens, prompt) if side == "theirs"
                                      else hearth_run(pipeline, args.tokens, prompt))
                        prefill[side].append(pre)
                        decode[side] += steps
                del pipeline
                d = {s: 1 / statistics.median(v) for s, v in decode.items()}
                p = {s: PROMPT_TOKENS / statistics.median(v) for s, v in prefill.items()}
                print(f"{threads:>7} {label + ' vs ' + kind:<18}{d['ours']:>11.1f} / {d['theirs']:<10.1f}"
                      f"{d['ours'] / d['theirs']:>7.2f}{p['ours']:>11.1f} / {p['theirs']:<10.1f}"
                      f"{p['ours'] / p['theirs']:>7.2f}{ours_bytes * d['ours'] / 1e9:>15.1f} / "
                      f"{theirs_bytes * d['theirs'] / 1e9:.1f}", flush=True)


if __name__ == "__main__":
    main()
