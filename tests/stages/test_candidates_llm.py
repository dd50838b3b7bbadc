"""The vLLM backend's request: a JSON-list constraint in the installed vLLM's spelling (vLLM cannot
run here, so a stand-in ``vllm`` module records what the generator asks of it)."""

import json
import sys
import types
from dataclasses import dataclass

import pytest

from ssam.model.llm import JSON_LIST_INSTRUCTION, JSON_LIST_SCHEMA, build_generator
from ssam.stages.candidates import parse_llm_output


@dataclass
class StructuredOutputsParams:  # vLLM >= 0.10.2
    json: dict | None = None


@dataclass
class GuidedDecodingParams:  # vLLM 0.6.3 .. 0.11
    json: dict | None = None


class FakeVllm:
    def __init__(self, new_api: bool):
        self.llm_kwargs, self.chats = None, []
        outer = self

        class LLM:
            def __init__(self, **kw):
                outer.llm_kwargs = kw

            def chat(self, messages, params, use_tqdm=True):
                outer.chats.append((messages, params))
                out = types.SimpleNamespace(text=json.dumps(["lamp", "Tables"]))
                return [types.SimpleNamespace(outputs=[out]) for _ in messages]

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        self.vllm = types.ModuleType("vllm")
        self.vllm.LLM, self.vllm.SamplingParams = LLM, SamplingParams
        self.sampling = types.ModuleType("vllm.sampling_params")
        if new_api:
            self.sampling.StructuredOutputsParams = StructuredOutputsParams
        else:
            self.sampling.GuidedDecodingParams = GuidedDecodingParams


@pytest.mark.parametrize(
    "new_api, keyword, cls",
    [(True, "structured_outputs", StructuredOutputsParams), (False, "guided_decoding", GuidedDecodingParams)],
)
def test_vllm_asks_for_a_json_list_of_strings(monkeypatch, new_api, keyword, cls):
    fake = FakeVllm(new_api)
    monkeypatch.setitem(sys.modules, "vllm", fake.vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", fake.sampling)
    gen = build_generator("vllm", "some/model", device="cuda", max_new_tokens=40, temperature=0.0, seed=3)
    answers = gen.generate(["List objects in 'a desk'."])
    messages, params = fake.chats[0]
    assert messages == [[{"role": "user", "content": f"List objects in 'a desk'. {JSON_LIST_INSTRUCTION}"}]]
    assert params.kw[keyword] == cls(json=JSON_LIST_SCHEMA)
    assert params.kw["max_tokens"] == 40 and params.kw["seed"] == 3
    assert JSON_LIST_SCHEMA["type"] == "array" and JSON_LIST_SCHEMA["items"]["type"] == "string"
    assert gen.provenance["structured_output"] == "json_list"
    assert parse_llm_output(answers[0]) == ["lamp", "table"]


def test_vllm_free_text_when_structured_output_is_off(monkeypatch):
    fake = FakeVllm(True)
    monkeypatch.setitem(sys.modules, "vllm", fake.vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", fake.sampling)
    gen = build_generator("vllm", "some/model", structured_output=False)
    gen.generate(["p"])
    messages, params = fake.chats[0]
    assert messages == [[{"role": "user", "content": "p"}]] and "structured_outputs" not in params.kw
    assert gen.provenance["structured_output"] is None
