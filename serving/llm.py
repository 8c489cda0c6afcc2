"""``LLM``: offline batched generation, shaped like vLLM's ``vllm.LLM``."""

from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

from tqdm.auto import tqdm

from serving.config import EngineArgs
from serving.engine import LLMEngine, PromptType
from serving.outputs import RequestOutput, RequestOutputKind
from serving.sampling_params import SamplingParams


class LLM:
    """``LLM(model=None, **engine_args)``: None serves the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: Optional[str] = None, **engine_args):
        unknown = sorted(set(engine_args) - set(EngineArgs.field_names()))
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        self.engine_args = EngineArgs(model=model, **engine_args)
        self.engine = LLMEngine.from_engine_args(self.engine_args)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.engine.default_sampling)

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
                 use_tqdm: bool = True, priority: Optional[Sequence[int]] = None) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling params")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(priority)} priorities")
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
                rid = str(next(self._ids))
                # Only the finished output is used: no RequestOutput is built while a request runs.
                self.engine.add_request(rid, prompt, params, priority=priority[i] if priority else 0,
                                        output_kind=RequestOutputKind.FINAL_ONLY)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, *, use_tqdm: bool = True,
             chat_template: Optional[str] = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: Optional[dict] = None,
             tools=None) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in convs:
            text = self.tokenizer.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, chat_template=chat_template, tools=tools,
                **(chat_template_kwargs or {}))
            # The template already rendered the special tokens (BOS etc.).
            prompts.append({"prompt": text,
                            "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 2)
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        done[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update(1)
        except BaseException:
            self.engine.abort_request(list(pending))
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]
