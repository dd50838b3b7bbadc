"""LLM backends for caption expansion: a registry of generators with one method, ``generate``.

- ``transformers``: any HF causal LM id or local directory, batched ``generate`` with left padding,
  the model's chat template when it has one. CPU or GPU.
- ``vllm``: ``vllm.LLM`` for GPU clusters (optional extra ``[vllm]``; imported only here). With
  ``structured_output`` (the default) its answers are constrained to a JSON list of strings by
  vLLM's structured outputs (guided decoding), and the prompt asks for one.
- ``none``: no LLM; the candidates stage then uses caption nouns and the vocabulary alone.

``smoke`` as a model id builds (once, into the cache) a 2-layer random GPT-2 with a byte-level
tokenizer and loads it back through ``from_pretrained`` -- the same path a real model takes.
Its output is random bytes; the parser drops almost all of it, which is the point of testing it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ssam.device import resolve_device
from ssam.io import atomic_path
from ssam.weights import WeightsUnavailable, cache_dir, offline

SMOKE_LLM = "smoke"
# The answer shape structured output asks for: a JSON list of short strings.
JSON_LIST_SCHEMA = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 48},
    "maxItems": 32,
}
JSON_LIST_INSTRUCTION = 'Answer with a JSON list of strings, for example ["lamp", "table"].'


class Generator(Protocol):
    provenance: dict

    def generate(self, prompts: list[str]) -> list[str]: ...


LLM_BACKENDS: dict[str, Callable[..., Generator | None]] = {}


def register_backend(name: str):
    def deco(fn):
        if name in LLM_BACKENDS:
            raise ValueError(f"LLM backend '{name}' is already registered")
        LLM_BACKENDS[name] = fn
        return fn

    return deco


def build_smoke_llm(path: Path, seed: int = 0) -> Path:
    """Write the smoke LLM (random 2-layer GPT-2 + ByT5 byte tokenizer) to ``path`` if absent."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    tok = ByT5Tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    with atomic_path(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return path


def _resolve_model_dir(model: str) -> str:
    if model == SMOKE_LLM:
        return str(build_smoke_llm(cache_dir() / "smoke-llm"))
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    return model  # an HF hub id


class TransformersGenerator:
    """Batched generation with ``transformers`` (greedy by default, so runs are repeatable)."""

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        dtype: str = "auto",
        seed: int = 0,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = _resolve_model_dir(model)
        kwargs = {"local_files_only": offline()}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            self.model = (
                AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
                .to(resolve_device(device))
                .eval()
            )
        except OSError as e:  # hub unreachable, not cached, not a model directory
            raise WeightsUnavailable(f"LLM '{model}' could not be loaded: {e}") from e
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = resolve_device(device)
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.provenance = {"backend": "transformers", "model": model, "smoke": model == SMOKE_LLM}

    def _format(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return prompt + "\n"

    def generate(self, prompts: list[str]) -> list[str]:
        import torch

        if not prompts:
            return []
        enc = self.tokenizer(
            [self._format(p) for p in prompts],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=384,
        ).to(self.device)
        sample = self.temperature > 0
        torch.manual_seed(self.seed)
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=sample,
                temperature=self.temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def json_schema_sampling_kwargs(schema: dict) -> dict:
    """The ``SamplingParams`` keyword that constrains output to ``schema``, as the installed vLLM spells it.

    vLLM >= 0.10.2: ``structured_outputs=StructuredOutputsParams(json=...)``; before (0.6.3 to
    0.11): ``guided_decoding=GuidedDecodingParams(json=...)``.
    """
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json=schema)}
    return {"structured_outputs": StructuredOutputsParams(json=schema)}


class VllmGenerator:
    """vLLM offline batched generation on GPUs (``pip install .[vllm]``)."""

    def __init__(
        self,
        model: str,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        dtype: str = "auto",
        structured_output: bool = True,
    ):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise WeightsUnavailable(
                "candidates.backend=vllm needs the vllm package: pip install '.[vllm]'"
            ) from e
        self.llm = LLM(
            model=_resolve_model_dir(model),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
        )
        self.structured = structured_output
        constraint = json_schema_sampling_kwargs(JSON_LIST_SCHEMA) if structured_output else {}
        self.params = SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, seed=seed, **constraint
        )
        self.provenance = {
            "backend": "vllm",
            "model": model,
            "smoke": model == SMOKE_LLM,
            "structured_output": "json_list" if structured_output else None,
        }

    def messages(self, prompts: list[str]) -> list[list[dict]]:
        """One chat per prompt; with structured output the prompt also asks for the JSON list."""
        suffix = f" {JSON_LIST_INSTRUCTION}" if self.structured else ""
        return [[{"role": "user", "content": p + suffix}] for p in prompts]

    def generate(self, prompts: list[str]) -> list[str]:
        msgs = self.messages(prompts)
        outs = self.llm.chat(msgs, self.params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]


@register_backend("transformers")
def _transformers(model: str, **kw) -> Generator:
    kw.pop("tensor_parallel_size", None)
    kw.pop("gpu_memory_utilization", None)
    kw.pop("structured_output", None)  # free text; the parser reads any list shape
    return TransformersGenerator(model, **kw)


@register_backend("vllm")
def _vllm(model: str, **kw) -> Generator:
    kw.pop("device", None)
    return VllmGenerator(model, **kw)


@register_backend("none")
def _none(model: str, **kw) -> None:
    return None


def build_generator(backend: str, model: str, **kwargs) -> Generator | None:
    """The generator of a registered backend, or None for ``none``."""
    if backend not in LLM_BACKENDS:
        raise KeyError(f"unknown LLM backend '{backend}'; registered: {sorted(LLM_BACKENDS)}")
    return LLM_BACKENDS[backend](model, **kwargs)
