"""The engine: add requests, step, read what each step produced. No I/O, no clocks but for timings.

    engine = LLMEngine(EngineConfig(model="path/to/model"))
    engine.add_request("r1", prompt_token_ids, SamplingParams(max_new_tokens=64))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.text, out.finished)

One step = schedule (continuous batching) -> one forward pass over the packed batch -> sample every
sequence that reached its end -> detokenize and check stop conditions -> free what finished.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from worker.engine.block_manager import BlockManager
from worker.engine.config import EngineConfig
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.lookahead import (
    LaunchedStep,
    PendingTokens,
    followers,
    following_ids,
    plan_following,
    prompt_chunks,
    schedule_following,
)
from worker.engine.model_runner import ModelRunner
from worker.engine.outputs import EngineStats, RequestOutput, StepTiming
from worker.engine.request_checks import check_request
from worker.engine.sampler import Sampler, TokenLogprobs, sample_seed
from worker.engine.sampling_params import SamplingParams
from worker.engine.scheduler import ScheduledBatch, Scheduler
from worker.engine.sequence import FinishReason, Sequence, SequenceStatus, sample_key
from worker.engine.step_inputs import plan_step, prompt_logprob_spans
from worker.engine.tokenizer import load_tokenizer
from worker.engine.warm_up import WarmUpReport, warm_up

# A token read but not yet made text (LLMEngine._advance, then _emit): the sequence, the token id, its logprobs,
# and whether it goes into the text (EOS and stop token ids do not).
NewToken = tuple[Sequence, int, TokenLogprobs | None, bool]


class LLMEngine:
    def __init__(
        self, config: EngineConfig, tokenizer: Tokenizer | None = None, model: PreTrainedModel | None = None
    ) -> None:
        self.config = config
        self.runner = ModelRunner(config, model)
        self.tokenizer = tokenizer or load_tokenizer(config.model)
        self.eos_token_id: int | None = self.runner.hf_config.eos_token_id
        if isinstance(self.eos_token_id, list):  # some configs list several; Llama has one
            self.eos_token_id = self.eos_token_id[0]
        self._fresh_bookkeeping()
        self.sampler = Sampler(self.runner.device, self.eos_token_id)
        self.sequences: dict[str, Sequence] = {}  # by Sequence.key
        self.forks: dict[str, int] = {}  # first sample's key -> samples it forks into after its prefill
        self._ahead: LaunchedStep | None = None  # a decode step launched before the previous one was read
        # Not under fault injection: its check reads a step's input ids on the host, which a step launched
        # ahead does not have.
        self._lookahead = config.decode_lookahead and config.fault_poison_token_id < 0
        # Compiles happen on CUDA only (Triton); elsewhere there is nothing to warm.
        self.warm_up_report: WarmUpReport | None = None
        if config.warm_up and self.runner.device.type == "cuda":
            self.warm_up_report = warm_up(self)

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV pool holds: what one request may hold at most."""
        return self.block_manager.num_blocks * self.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    # -- requests ----------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        generated_token_ids: list[int] | None = None,
        sent_text: str = "",
        n: int = 1,
        index: int = 0,
    ) -> None:
        """Queue a request. Raises ValueError if it can never run (too long, bad token ids, duplicate id).

        To continue a generation another engine started (its worker died), pass the tokens it had already
        delivered and the text the client has received: they are prefilled with the prompt, count towards
        max_new_tokens and sampling resumes at the next token index (same seed, same draws), and the text
        continues where the client's stops.

        n > 1 asks for n samples of the prompt: one sequence prefills it, and when its first token is sampled
        it forks into n (see _fork), which share the prompt's KV blocks. `index` names one sample of such a
        request when samples are added on their own (a continuation)."""
        key = sample_key(request_id, index)
        if key in self.sequences:
            raise ValueError(f"request {request_id!r} is already in the engine")
        if n < 1 or (n > 1 and (index or generated_token_ids)):
            raise ValueError("n must be >= 1; samples of a continuation are added one index at a time")
        if index:  # sample `index` of a request draws with its own seed, as when it was forked (see _fork)
            params = dataclasses.replace(params, seed=sample_seed(params.seed, index), prompt_logprobs=False)
        generated = generated_token_ids or []
        check_request(prompt_token_ids, generated, params, self.vocab_size, self.max_model_len, self.kv_capacity_tokens)
        detok = IncrementalDetokenizer(
            self.tokenizer,
            prompt_token_ids,
            params.stop,
            self.config.detokenizer_context_tokens,
            include_stop=params.include_stop_sequence,
        )
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, detok, index=index)
        if params.prompt_logprobs and not generated_token_ids:  # a continuation's client already has them
            seq.prompt_logprobs = []
        if generated_token_ids:
            seq.token_ids.extend(generated_token_ids)
            detok.replay(generated_token_ids, sent_text)
        self.sequences[key] = seq
        if n > 1:
            self.forks[key] = n
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now (every sample of it) and free its blocks; returns the final output of each
        sample still running (empty if none)."""
        self.forks.pop(request_id, None)
        outputs = []
        for seq in [s for s in self.sequences.values() if s.request_id == request_id]:
            del self.sequences[seq.key]
            self.scheduler.finish(seq)
            seq.finish_reason = FinishReason.ABORTED
            outputs.append(self._output(seq, [], [], ""))
        return outputs

    def reset(self) -> None:
        """Forget every cached prefix, count and timing: the engine as just built, its model, KV memory, graphs
        and compiled kernels kept (after warm_up.py's requests). The engine must be idle."""
        if self.has_unfinished() or self.sequences:
            raise RuntimeError("reset needs an idle engine")
        self._fresh_bookkeeping()

    def _fresh_bookkeeping(self) -> None:
        config = self.config
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.step_timing = StepTiming()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._ahead is not None

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.block_manager.num_free_blocks,
            num_blocks=self.block_manager.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_rate=self.block_manager.prefix_hit_rate,
        )

    # -- the step ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run a step (or take the one launched ahead by the previous call) and return what it produced.
        Before reading its tokens, the next decode step may be launched behind it (lookahead.py); while
        requests wait for room, the next step goes out before this one's outputs are returned."""
        step, self._ahead = self._ahead, None
        if step is not None and all(seq.is_finished for seq in step.batch.seqs):
            step = None  # every sequence of it was aborted meanwhile: nothing to read, schedule anew
        if step is None:
            step = self._launch()
            if step is None:
                return []
        if self._lookahead and not self.forks:
            self._ahead = self._launch_following(step)
        read = self._read(step)
        if (
            self._ahead is None
            and self._lookahead
            and not self.forks
            and (self.scheduler.waiting or self._prefilling())
        ):
            # Saturated, or a prompt goes on in chunks (lookahead.py, "launched before returning"): the next step
            # is scheduled now, as the next call would, and computes while this step's tokens become text and
            # outputs and while the caller handles them.
            self._ahead = self._launch()
            if self._ahead is not None:
                self._ahead.early = True
        emitting = time.perf_counter()
        outputs = [self._emit(*new_token) for new_token in read]
        self.step_timing.outputs_s += time.perf_counter() - emitting
        return outputs

    def _prefilling(self) -> bool:
        """A running sequence still has prompt tokens to compute: the next step carries its chunk."""
        return any(seq.num_uncomputed_tokens > 1 for seq in self.scheduler.running)

    def _launch(self) -> LaunchedStep | None:
        """Schedule a step and put it on the GPU, sampling included; nothing waits for it."""
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return None
        now = time.time()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        plan = plan_step(batch, self.config.block_size)
        if self.config.fault_poison_token_id >= 0 and self.config.fault_poison_token_id in plan.input_ids:
            raise RuntimeError("fault injection: poison token in the step's input")
        prompt_spans = prompt_logprob_spans(batch, plan)
        planned = time.perf_counter()
        if prompt_spans:
            # Logits of the sampled rows, then of these rows, in this order (see step_inputs.prompt_logprob_spans).
            logits = self.runner.run(plan, [row for _, rows, _ in prompt_spans for row in rows])
        else:
            logits = self.runner.run(plan)
        sampled = [batch.seqs[i] for i in plan.sampled_seq_indices]
        tokens = self.sampler.choose(
            logits[: len(sampled)],
            [s.params for s in sampled],
            [s.num_generated_tokens for s in sampled],
            [s.token_ids for s in sampled],
        )
        return LaunchedStep(
            batch, plan, sampled, logits, PendingTokens(tokens), prompt_spans,
            started=started, planned=planned, launched=time.perf_counter(),
        )  # fmt: skip

    def _launch_following(self, step: LaunchedStep) -> LaunchedStep | None:
        """The step after `step`, launched before `step`'s tokens are read (lookahead.py): its decodes, and
        the next chunks of the prompts it left unfinished."""
        started = time.perf_counter()
        rows = followers(step, self.max_model_len)
        if rows is None:
            return None
        running = self.scheduler.running
        if sum(not seq.is_finished for seq in step.batch.seqs) != len(running):
            # A running sequence sat this step out (its prompt chunk found no budget left): the next step is
            # scheduled, or it could wait behind decode steps launched ahead for as long as they go on.
            return None
        chunks = prompt_chunks(step)
        if self.scheduler.waiting and (len(rows) + len(chunks) < len(running) or self.scheduler.could_start_waiting()):
            # A waiting request is scheduled next when it can start: when a sequence leaves with this step
            # (its blocks and slot free up), or when it may fit already.
            return None
        following = schedule_following(step, rows, chunks, self.scheduler, self.block_manager)
        if following is None:
            return None
        seqs, computing, scheduled, sources = following
        plan = plan_following(seqs, computing, scheduled, self.block_manager, self.config.block_size)
        input_ids = following_ids(step, plan, sources)
        planned = time.perf_counter()
        logits = self.runner.run(plan, input_ids=input_ids)
        sampled = [seqs[i] for i in plan.sampled_seq_indices]
        # A sequence whose token is in flight has generated one more than it counts: this step's own comes first.
        generated = [seqs[i].num_generated_tokens + (sources[i] is not None) for i in plan.sampled_seq_indices]
        tokens = self.sampler.choose(logits, [s.params for s in sampled], generated)
        return LaunchedStep(
            ScheduledBatch(seqs, scheduled), plan, sampled, logits, PendingTokens(tokens), ahead=True,
            started=started, planned=planned, launched=time.perf_counter(),
        )  # fmt: skip

    def _read(self, step: LaunchedStep) -> list[NewToken]:
        """Wait for a step's tokens, then advance its sequences: counts, cached blocks, the new tokens and the
        ends they make by themselves (_advance). Their text, stop strings and outputs come after (_emit), so that
        a step launched early does not wait for them. A sequence that ended while a step launched ahead was
        running has computed a token too many: skipped."""
        reading = time.perf_counter()
        token_ids = step.tokens.read()
        waited = time.perf_counter()
        if step.ahead:  # (launched ahead only when no sequence wants logprobs)
            logprobs = [None] * len(token_ids)
        else:
            # (The sampled rows only: prompt logprobs' rows follow them.)
            sampled_logits = step.logits[: len(step.sampled)]
            logprobs = self.sampler.logprobs(sampled_logits, token_ids, [s.params for s in step.sampled])
        if step.prompt_spans:
            self._record_prompt_logprobs(step.prompt_spans, step.logits[len(step.sampled) :])
        for seq, n in zip(step.batch.seqs, step.batch.num_scheduled_tokens, strict=True):
            if not seq.is_finished:
                seq.num_computed_tokens += n
                self.block_manager.register_full_blocks(seq)
        now = time.time()
        read: list[NewToken] = []
        for row, (seq, token_id, lp) in enumerate(zip(step.sampled, token_ids, logprobs, strict=True)):
            if seq.is_finished:
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            n = self.forks.pop(seq.key, 1) if seq.num_generated_tokens == 0 else 1
            if n > 1:
                read.extend(self._fork(seq, n, step.logits[row]))
            read.append(self._advance(seq, token_id, lp))
        timing = self.step_timing
        timing.steps += 1
        timing.schedule_s += step.planned - step.started
        timing.launch_s += step.launched - step.planned
        timing.sample_s += waited - reading  # waits for the GPU: the step's one host sync
        timing.outputs_s += time.perf_counter() - waited
        timing.batch_tokens += len(step.plan.input_ids)
        timing.steps_ahead += step.ahead
        timing.steps_early += step.early
        return read

    def _record_prompt_logprobs(self, spans: list[tuple[Sequence, range, list[int]]], logits: torch.Tensor) -> None:
        """Turn the extra rows' logits (in span order) into TokenLogprobs appended to each sequence's list."""
        targets = [t for _, _, ids in spans for t in ids]
        num_top = [max(seq.params.logprobs, 0) for seq, _, ids in spans for _ in ids]
        entries = self.sampler.token_logprobs(logits, targets, num_top)
        at = 0
        for seq, _, ids in spans:
            seq.prompt_logprobs.extend(entries[at : at + len(ids)])
            at += len(ids)

    def _advance(self, seq: Sequence, token_id: int, logprobs: TokenLogprobs | None) -> NewToken:
        """Append a sampled token and end the generation where the token alone says so: EOS or a stop token id
        (neither is part of the text), or the length limits. Stop strings need the text: _emit."""
        seq.token_ids.append(token_id)
        params = seq.params
        # EOS and stop token ids end the generation only after min_new_tokens (before, the sampler masks
        # them; one that comes anyway, e.g. in a continuation's tokens, is an ordinary token).
        may_end = seq.num_generated_tokens > params.min_new_tokens
        eos = token_id == self.eos_token_id and not params.ignore_eos
        if may_end and (token_id in params.stop_token_ids or eos):
            self._finish(seq, FinishReason.EOS)  # stop_sequence stays ""
            return seq, token_id, logprobs, False
        if seq.num_generated_tokens >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, FinishReason.LENGTH)  # (a stop string the token completes takes precedence)
        return seq, token_id, logprobs, True

    def _emit(self, seq: Sequence, token_id: int, logprobs: TokenLogprobs | None, in_text: bool) -> RequestOutput:
        """The token's text, where a completed stop string ends the generation, and the request's output."""
        if in_text and (matched := seq.detokenizer.push(token_id)) is not None:
            if not seq.is_finished:  # (it may have a token in a step launched since: skipped when read)
                self._finish(seq, FinishReason.STOP_SEQUENCE)
            seq.finish_reason, seq.stop_sequence = FinishReason.STOP_SEQUENCE, matched
        out = self._output(seq, [token_id], [logprobs] if logprobs else [], seq.detokenizer.take(seq.is_finished))
        if seq.prompt_logprobs is not None:  # the request's first output
            out.prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        return out

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        del self.sequences[seq.key]

    def _fork(self, first: Sequence, n: int, logits: torch.Tensor) -> list[NewToken]:
        """The first sample has just prefilled the prompt: make samples 1..n-1, sharing its KV blocks (the
        partly filled last one copied), each drawing its first token from the same logits with its own seed. A
        sample with no seat in the batch or no block for its copy waits, and is recomputed when room frees."""
        children = []
        for index in range(1, n):
            params = dataclasses.replace(
                first.params, seed=sample_seed(first.params.seed, index), prompt_logprobs=False
            )
            detok = IncrementalDetokenizer(
                self.tokenizer, first.token_ids, params.stop, self.config.detokenizer_context_tokens,
                include_stop=params.include_stop_sequence,
            )  # fmt: skip
            child = Sequence(
                first.request_id, list(first.token_ids), first.num_prompt_tokens, params, detok, index=index
            )
            child.first_scheduled_time, child.first_token_time = first.first_scheduled_time, first.first_token_time
            self.scheduler.adopt(first, child, self.runner.copy_block)
            self.sequences[child.key] = child
            children.append(child)
        result = self.sampler(
            logits.unsqueeze(0).expand(len(children), -1), [c.params for c in children], [0] * len(children),
            [c.token_ids for c in children],
        )  # fmt: skip
        return [
            self._advance(child, token_id, logprobs)
            for child, token_id, logprobs in zip(children, result.token_ids, result.logprobs, strict=True)
        ]

    @staticmethod
    def _output(seq: Sequence, token_ids: list[int], logprobs: list[TokenLogprobs], text: str) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            index=seq.index,
            new_token_ids=token_ids,
            text=text,
            finished=seq.status is SequenceStatus.FINISHED,
            finish_reason=seq.finish_reason,
            stop_sequence=seq.stop_sequence,
            logprobs=logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_generated_tokens,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
        )
