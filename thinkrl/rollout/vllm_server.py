"""Served vLLM engines (``rollout.vllm_mode=server``): thoughts sampled by running vLLM OpenAI-compatible servers.

The servers are vLLM's own (``thinkrl serve`` starts one on the recipe's reasoner with the flags below; any
``vllm serve`` with them works). Each request is what the colocated engine gets: a token-id prompt, ``n=K``, one
seed per position, stop at the end marker, the start marker banned, processed log-probs and the sampled token ids,
so a position's thoughts are the same whatever server or batch samples them. A step's positions are shared among
the servers window by window (a window's positions stay on one server, whose prefix cache then holds its text).

Weights go through vLLM's weight-transfer routes: ``/pause`` (drain, clear the caches) → ``/start_weight_update``
→ ``/update_weights`` (the tensors themselves over the ``thinkrl_gloo`` group, see gloo_transfer.py) →
``/finish_weight_update`` (with the weight version) → ``/resume``. The group is opened once, at start, when the
learner's starting weights are pushed, so the servers serve exactly the learner's reasoner whatever they loaded.
Every wait is bounded (``rollout.vllm_sync_timeout_s``); a server that stops answering ends the run with one line.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import torch

from thinkrl.errors import ConfigError
from thinkrl.rollout.vllm_actor import Completion, VLLMEngineError, VLLMRolloutActor, greedy_fields, sampling_fields

logger = logging.getLogger(__name__)

# What thinkrl needs of a server, beyond the model folder (thinkrl serve passes these; docs/rollouts.md lists them).
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # the RL routes (/pause, weight transfer) exist only in dev mode
SERVER_FLAGS = (
    "--skip-tokenizer-init",  # prompts are token ids
    "--logprobs-mode",
    "processed_logprobs",  # after temperature and the start-marker ban: the learner's policy
    "--enable-prefix-caching",
    "--enable-prompt-tokens-details",  # cached prompt tokens, for compute accounting
)
VLLM_BACKEND = {"gloo": "thinkrl_gloo", "nccl": "nccl"}  # rollout.vllm_transfer -> vLLM's weight-transfer backend


def transfer_backend(cfg) -> str:
    """``rollout.vllm_transfer`` on this machine: auto = nccl with CUDA (vLLM's own backend, GPU to GPU), else the
    gloo backend of gloo_transfer.py. The server (``thinkrl serve``) and the trainer decide alike."""
    if cfg.vllm_transfer != "auto":
        return cfg.vllm_transfer
    return "nccl" if torch.cuda.is_available() else "gloo"


def server_flags(cfg) -> list[str]:
    """What a server must be started with for this recipe's training runs."""
    import json

    return [*SERVER_FLAGS, "--weight-transfer-config", json.dumps({"backend": VLLM_BACKEND[transfer_backend(cfg)]})]


HOW_TO_START = "start one with `thinkrl serve --config RECIPE` (docs/rollouts.md)"


def _detail(response) -> str:
    """A refusal's reason: the workers' own error where vLLM wraps one, else the start of the body."""
    text = response.text.strip().replace("\n", " ")
    try:
        text = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    match = re.search(r"Worker failed with error '(.*?)'(, please| ?$)", text)
    return (match.group(1) if match else text)[:300]


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


class ServerClient:
    """One vLLM server: completions and the RL routes over HTTP, every call bounded by ``timeout_s``."""

    def __init__(self, url: str, timeout_s: float):
        import requests  # a vLLM dependency
        from requests.adapters import HTTPAdapter

        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=64))
        self.model = ""

    def _call(self, method: str, path: str, what: str, timeout: float | None = None, **kwargs):
        import requests

        try:
            response = self.session.request(method, self.url + path, timeout=timeout or self.timeout_s, **kwargs)
        except requests.Timeout:
            raise VLLMEngineError(
                f"the vLLM server at {self.url} did not finish {what} within {timeout or self.timeout_s:.0f} s "
                "(rollout.vllm_sync_timeout_s); the last checkpoint is intact: check the server, then rerun the same "
                "command to resume"
            ) from None
        except requests.ConnectionError:
            raise VLLMEngineError(
                f"the vLLM server at {self.url} stopped answering while {what}; the last checkpoint is intact: "
                f"{HOW_TO_START.replace('start one', 'start it again')}, then rerun the same command to resume"
            ) from None
        if response.status_code >= 400:
            raise VLLMEngineError(
                f"the vLLM server at {self.url} refused {what} (HTTP {response.status_code}: {_detail(response)})"
            )
        return response.json() if response.content else None

    def check(self, max_model_len: int) -> int:
        """Before any training: the server answers, has the RL routes, and takes prompts this long. Returns its
        number of workers (tensor × pipeline parallel ranks), each a member of the weight-transfer group. (A server
        of another model or vocabulary is refused by its workers when the learner's weights are first pushed.)"""
        import requests

        try:
            models = self.session.get(self.url + "/v1/models", timeout=10).json()["data"]
        except (requests.RequestException, ValueError, KeyError) as exc:
            raise ConfigError(
                f"rollout.vllm_urls: no vLLM server answers at {self.url} ({type(exc).__name__}); {HOW_TO_START}"
            ) from None
        self.model = models[0]["id"]
        served_len = int(models[0].get("max_model_len") or 0)
        if served_len and served_len < max_model_len:
            raise ConfigError(
                f"the vLLM server at {self.url} takes {served_len} tokens a sequence, needs {max_model_len}; "
                "restart it with a larger --max-model-len (thinkrl serve sets it from the recipe)"
            )
        response = self.session.get(self.url + "/get_world_size", timeout=10)
        if response.status_code == 404:
            raise ConfigError(
                f"the vLLM server at {self.url} has no RL routes: start it with VLLM_SERVER_DEV_MODE=1 and "
                f"--weight-transfer-config (the flags of `thinkrl serve --dry-run`; {HOW_TO_START})"
            )
        return int(response.json()["world_size"])

    def complete(self, body: dict) -> dict:
        return self._call("POST", "/v1/completions", "sampling", json={"model": self.model, **body})

    # vLLM's VLLMWeightSyncClient protocol (the trainer-side weight-transfer engine drives these)
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._call(
            "POST", "/init_weight_transfer_engine", "joining the weight transfer", json={"init_info": init_info}
        )

    def start_weight_update(self) -> None:
        self._call("POST", "/start_weight_update", "starting a weight update")

    def update_weights(self, update_info) -> None:
        self._call("POST", "/update_weights", "receiving weights", json={"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        body = {"weight_version": weight_version} if weight_version is not None else None
        self._call("POST", "/finish_weight_update", "finishing a weight update", json=body)

    def pause(self) -> None:
        # wait: requests in flight finish with the old weights (none in a synchronous run); then the prefix and KV
        # caches are cleared, since cached prefixes hold the old weights' keys and values
        self._call("POST", "/pause", "pausing", params={"mode": "wait", "clear_cache": "true"})

    def resume(self) -> None:
        self._call("POST", "/resume", "resuming")

    def weight_version(self) -> str | None:
        return (self._call("GET", "/weight_info", "reporting its weight version") or {}).get("weight_version")


class ServersClient:
    """Several servers as one ``VLLMWeightSyncClient``: one gloo group holds the learner (rank 0) and every worker
    of every server, so each tensor is broadcast once to all of them."""

    def __init__(self, servers: list[ServerClient], workers: list[int]):
        self.servers = servers
        self.offsets = [1 + sum(workers[:j]) for j in range(len(servers))]

    def _each(self, fn) -> None:
        with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:  # they meet in the same collectives
            for future in [pool.submit(fn, j, s) for j, s in enumerate(self.servers)]:
                future.result()

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._each(lambda j, s: s.init_weight_transfer_engine({**init_info, "rank_offset": self.offsets[j]}))

    def start_weight_update(self) -> None:
        self._each(lambda j, s: s.start_weight_update())

    def update_weights(self, update_info) -> None:
        self._each(lambda j, s: s.update_weights(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._each(lambda j, s: s.finish_weight_update(weight_version))


def _is_sender() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class VLLMServerActor(VLLMRolloutActor):
    """The vLLM rollout actor over served engines: the same requests, tensors and bookkeeping as the colocated one;
    only the transport differs. Under ``accelerate launch`` every process samples its own positions from the shared
    servers and the first process alone pushes weights (the others gather with it under FSDP2)."""

    def _start(self, max_model_len: int) -> None:
        cfg = self.cfg
        if not cfg.vllm_urls:
            raise ConfigError(
                f"rollout.vllm_mode=server needs rollout.vllm_urls (one or more server URLs); {HOW_TO_START}"
            )
        if cfg.vllm_sync == "disk":
            raise ConfigError(
                "rollout.vllm_sync=disk needs rollout.vllm_mode=colocate: servers take weights in memory"
            )
        if transfer_backend(cfg) == "nccl" and not torch.cuda.is_available():
            raise ConfigError("rollout.vllm_transfer=nccl needs a GPU in the learner: use gloo (or auto) here")
        self.servers = [ServerClient(url, cfg.vllm_sync_timeout_s) for url in cfg.vllm_urls]
        workers = [server.check(max_model_len) for server in self.servers]
        self.sender = _is_sender()
        host = urlparse(self.servers[0].url).hostname or "127.0.0.1"
        from thinkrl.rollout.weight_sync import gloo_trainer, local_address_towards, nccl_trainer

        self._client = ServersClient(self.servers, workers)
        start = time.perf_counter()
        address = local_address_towards(host)
        if transfer_backend(cfg) == "nccl":
            self._sender = nccl_trainer(self._client, self.model, sum(workers), address, self.sender)
        else:
            self._sender = gloo_trainer(
                self._client, self.model, sum(workers), address, cfg.vllm_sync_timeout_s, self.sender
            )
        self.version = 0
        self._llm = self.servers  # the engine is up: ``_engine`` does not start it again
        self._push()  # the servers now serve the learner's reasoner, whatever folder they loaded
        logger.info("vLLM servers %s joined in %.1f s", ", ".join(cfg.vllm_urls), time.perf_counter() - start)

    def _check_supported(self, model) -> None:  # the servers' own platform decides (and refuses at start)
        pass

    def _engine_alive(self) -> bool:  # a server that dies fails its next request with one line
        return True

    def close(self) -> None:
        self._llm, self._sender = None, None

    def _push(self) -> None:
        if self.sender:
            self._each_server(lambda s: s.pause())
        self._sender.send_weights(str(self.version) if self.sender else None)
        if self.sender:
            self._each_server(lambda s: s.resume())
        _barrier()  # no process samples before every server holds the new weights

    def _each_server(self, fn) -> None:
        for server in self.servers:
            fn(server)

    def sync_weights(self) -> float:
        start = time.perf_counter()
        self.version += 1
        self._push()
        self.staleness = 0
        return time.perf_counter() - start

    # ------------------------------------------------------------------------------------------------------------
    def _requests(self, bodies: list[dict], groups) -> list[dict]:
        groups = groups if groups is not None else range(len(bodies))
        picks = [self.servers[g % len(self.servers)] for g in groups]
        with ThreadPoolExecutor(max_workers=max(1, min(64, len(bodies)))) as pool:
            return list(pool.map(lambda sb: sb[0].complete(sb[1]), zip(picks, bodies)))

    def _sample_prompts(self, prompts, k, seeds, groups=None) -> list[Completion]:
        bodies = []
        for prompt, seed in zip(prompts, seeds):
            fields = sampling_fields(self.cfg, k, seed % (2**31 - 1), self.sot_id, self.eot_id)
            fields["logit_bias"] = {str(t): b for t, b in fields["logit_bias"].items()}
            bodies.append({"prompt": prompt, "return_tokens_as_token_ids": True, **fields})
        return [_completion(r, with_logps=True) for r in self._requests(bodies, groups)]

    def _greedy_prompts(self, prompts, max_new_tokens, stop_ids, marker_ids) -> list[Completion]:
        fields = greedy_fields(max_new_tokens, stop_ids, marker_ids)
        if fields["logit_bias"]:
            fields["logit_bias"] = {str(t): b for t, b in fields["logit_bias"].items()}
        else:
            fields.pop("logit_bias")
        bodies = [{"prompt": p, "return_tokens_as_token_ids": True, "logprobs": 0, **fields} for p in prompts]
        return [_completion(r, with_logps=False) for r in self._requests(bodies, None)]


def _completion(response: dict, with_logps: bool) -> Completion:
    samples = []
    for choice in sorted(response["choices"], key=lambda c: c["index"]):
        lp = choice.get("logprobs") or {}
        ids = [_token_id(t) for t in lp.get("tokens") or []]
        samples.append((ids, list(lp.get("token_logprobs") or []) if with_logps else []))
    usage = response.get("usage") or {}
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    return Completion(samples, int(usage.get("prompt_tokens") or 0), int(cached))
