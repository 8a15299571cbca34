"""Real DeepSpeed ZeRO-2 / ZeRO-3 runs of the synthetic XComposer model (fixture builder).

``train_zero(out_dir, ZeroSpec(stage=3))`` starts ``world_size`` worker processes (gloo on
127.0.0.1, CPU only), wraps the tiny model with the official LoRA recipe, takes a step or two
under DeepSpeed and writes everything the ZeRO tests and checks need::

    out_dir/
      checkpoint/             engine.save_checkpoint: latest, global_stepN/, zero_to_fp32.py,
                              plus adapter_config.json (as the HF Trainer leaves it)
      adapter-naive/          save_pretrained on rank 0 without gathering (ZeRO-3: 0-element tensors)
      adapter-gathered/       save_pretrained inside deepspeed.zero.GatheredParameters on all ranks
      adapter-consolidated/   save_pretrained(state_dict=engine._zero3_consolidated_16bit_state_dict())
                              (ZeRO-2: the module's own state dict, which is complete there)
      reference.safetensors   rank 0's logits of the trained engine on a fixed probe batch, with
                              its input_ids, inputs_embeds, im_mask and attention_mask
      manifest.json           spec, tag, losses, timings, run id, what each directory is
      logs/                   job.json and each worker's stdout+stderr (rank{r}.log)

``train_zero_many(out_dir, {"zero2": ZeroSpec(stage=2), "zero3-bf16": ZeroSpec(stage=3, bf16=True)})``
trains several runs in ONE launch (``out_dir/<name>/`` each, logs in ``out_dir/logs``): worker
start-up (importing torch, transformers, peft) is most of a run's cost. ``build_zero_many``,
``build_zero_runs`` (by stage) and ``build_zero_run`` are the cached, xdist-safe entry points.

Traps handled here (REFERENCE.md section 6, plus one found while writing this):
``deepspeed.comm.torch.build_shm_op`` is stubbed before ``init_distributed`` (it would compile a
C++ extension); a plain torch AdamW with ``zero_allow_untested_optimizer``; DeepSpeed's two Muon
modules, imported by ZeRO for an isinstance check and an unused update function, are replaced
by stand-ins (their import-time ``torch.compile`` costs 2-4 s per rank). ``stage3_param_persistence_threshold: 0``
makes ZeRO-3 partition even these tiny parameters. In fp32 runs every way of saving yields the
same numbers; in bf16 runs the saved adapters are bf16 and zero_to_fp32 returns the fp32 master
weights they were rounded from. Workers are plain subprocesses with a hard deadline; on any failure
or timeout every worker is terminated, killed if need be, and reaped; each worker also exits
by itself if its parent disappears, so no process outlives a build.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .family import TINY, Dims

WORKER_MODULE = "harness.synthetic.zero_train"
REFERENCE_PROBE_SEED = 4242
DEFAULT_TIMEOUT_S = 240.0


class ZeroTrainError(RuntimeError):
    """A DeepSpeed worker failed or timed out (the message names the rank and ends with its log)."""


@dataclass(frozen=True)
class ZeroSpec:
    """One DeepSpeed run: ZeRO stage, ranks, model, LoRA recipe and training length."""

    stage: int = 3
    world_size: int = 2
    variant: str = "ixc2.5"
    dims: Dims = TINY
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 8
    steps: int = 2
    lr: float = 1e-2
    micro_batch: int = 2
    seq_len: int = 12
    bf16: bool = False  # DeepSpeed bf16 mode: bf16 parameters, fp32 master weights in the optimizer

    def params(self) -> dict:
        return asdict(self)

    @property
    def tag(self) -> str:
        return f"global_step{self.steps}"

    @classmethod
    def from_params(cls, params: dict) -> ZeroSpec:
        params = dict(params)
        params["dims"] = Dims(**params["dims"])
        return cls(**params)


@dataclass(frozen=True)
class ZeroRun:
    """Paths of one finished run (see the module docstring for the layout)."""

    root: Path
    spec: ZeroSpec
    base_dir: Path | None
    manifest: dict = field(compare=False)

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoint"

    @property
    def naive_adapter_dir(self) -> Path:
        return self.root / "adapter-naive"

    @property
    def gathered_adapter_dir(self) -> Path:
        return self.root / "adapter-gathered"

    @property
    def consolidated_adapter_dir(self) -> Path:
        return self.root / "adapter-consolidated"

    @property
    def reference_file(self) -> Path:
        return self.root / "reference.safetensors"

    def reference(self) -> dict:
        """``{"input_ids", "inputs_embeds", "im_mask", "attention_mask", "logits"}`` tensors."""
        from safetensors.torch import load_file

        return load_file(self.reference_file)

    @classmethod
    def open(cls, root: str | Path) -> ZeroRun:
        root = Path(root)
        manifest = json.loads((root / "manifest.json").read_text())
        base = manifest.get("base_dir")
        return cls(root=root, spec=ZeroSpec.from_params(manifest["spec"]),
                   base_dir=Path(base) if base else None, manifest=manifest)


# --------------------------------------------------------------------------- parent side


def deepspeed_config(spec: ZeroSpec) -> dict:
    """The DeepSpeed config of a run (fp32 or bf16, no offload, tiny parameters really partitioned)."""
    zero: dict = {"stage": spec.stage}
    precision = {"bf16": {"enabled": True}} if spec.bf16 else {}
    if spec.stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": spec.micro_batch * spec.world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
        **precision,
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(rank: int, world_size: int, port: int) -> dict:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",  # CPU + gloo even on a machine with GPUs
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1", PYTHONUNBUFFERED="1", PYTHONHASHSEED="0",
    )
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # never a hostname that resolves elsewhere
    return env


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate, then kill, then reap every worker that is still running."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _stages(job: dict) -> str:
    return "runs: " + ", ".join(f"ZeRO-{run['spec']['stage']}" + (" bf16" if run["spec"].get("bf16") else "")
                                for run in job["runs"])


def _launch(out: Path, job: dict, world_size: int, timeout: float) -> None:
    """Start the workers, wait for all of them, stop all of them; one retry if the port was taken."""
    try:
        _launch_once(out, job, world_size, timeout)
    except ZeroTrainError:
        logs = [(out / "logs" / f"rank{r}.log") for r in range(world_size)]
        if not any("Address already in use" in p.read_text(errors="replace") for p in logs if p.exists()):
            raise
        _launch_once(out, job, world_size, timeout)  # another process took the free port first


def _launch_once(out: Path, job: dict, world_size: int, timeout: float) -> None:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    job_file = out / "logs" / "job.json"
    port = free_port()
    job = {**job, "launched_at": time.time()}
    job_file.write_text(json.dumps(job, indent=2, sort_keys=True))
    procs: list[subprocess.Popen] = []
    handles = []
    try:
        for rank in range(world_size):
            log = open(logs / f"rank{rank}.log", "wb")
            handles.append(log)
            command = [sys.executable, "-m", WORKER_MODULE, "--worker", str(job_file), "--run-id", job["run_id"]]
            if job.get("fail_rank") == rank:  # test hook: this rank dies at once, the others are mid-start
                message = f"zero_train rank {rank}: injected failure (fail_rank={rank})"
                command = [sys.executable, "-c", f"import sys; sys.exit({message!r})", "--run-id", job["run_id"]]
            procs.append(subprocess.Popen(
                command,
                env=_worker_env(rank, world_size, port), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=str(out),
            ))
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # The first rank to die wrote its log last the earliest; the others often only
                # fail because their peer vanished mid-collective.
                failed.sort(key=lambda r: (logs / f"rank{r}.log").stat().st_mtime_ns)
                rank = failed[0]
                also = f", then rank {', '.join(map(str, failed[1:]))}" if failed[1:] else ""
                raise ZeroTrainError(
                    f"{logs / f'rank{rank}.log'}: DeepSpeed worker rank {rank} of {world_size} exited with code "
                    f"{codes[rank]}{also} ({_stages(job)}); read the log below and fix the cause.\n"
                    + _tail(logs / f"rank{rank}.log")
                )
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                raise ZeroTrainError(
                    f"{logs}: DeepSpeed workers did not finish within {timeout:g} s ({_stages(job)}); "
                    "raise the timeout or read the rank logs.\n" + _tail(logs / "rank0.log")
                )
            time.sleep(0.05)
    finally:
        _stop(procs)
        for h in handles:
            h.close()


def _job(runs: list[tuple[ZeroSpec, Path, str | Path | None]], timeout: float, fail_rank: int | None) -> dict:
    return {
        "runs": [{"spec": spec.params(), "out_dir": str(out.resolve()), "ds_config": deepspeed_config(spec),
                  "base_dir": str(base) if base else None}
                 for spec, out, base in runs],
        "run_id": uuid.uuid4().hex,
        "parent_pid": os.getpid(),
        "timeout": timeout,
        "fail_rank": fail_rank,
    }


def _finish(out: Path, wall_s: float) -> ZeroRun:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["launch_wall_s"] = round(wall_s, 2)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return ZeroRun.open(out)


def _check_spec(spec: ZeroSpec) -> None:
    if spec.stage not in (2, 3):
        raise ValueError(f"ZeroSpec.stage={spec.stage}: only ZeRO stages 2 and 3 are built; pass stage=2 or 3")
    if spec.world_size < 1:
        raise ValueError(f"ZeroSpec.world_size={spec.world_size}: need at least one rank")


def train_zero_many(
    out_dir: str | Path,
    specs: Mapping[str, ZeroSpec],
    *,
    base_dirs: Mapping[str, str | Path] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    fail_rank: int | None = None,
) -> dict[str, ZeroRun]:
    """Train every ``specs[name]`` into ``out_dir/name`` in ONE launch of ``world_size`` workers.

    Each run gets a fresh model, engine and optimizer (layout in the module docstring); sharing
    the worker start-up (imports are most of a run) makes each extra run cost about a second.
    ``base_dirs[name]`` (the exported base model of that spec's variant/dims/seed) is recorded as
    the adapters' ``base_model_name_or_path``. ``fail_rank`` makes that rank's process exit with an
    error as soon as it starts (to test that a failed run leaves no process behind).
    """
    if not specs:
        raise ValueError("specs is empty: pass at least one ZeroSpec")
    worlds = {spec.world_size for spec in specs.values()}
    if len(worlds) != 1:
        raise ValueError(f"specs use world sizes {sorted(worlds)}: one launch needs one world size")
    out = Path(out_dir)
    runs = []
    for name, spec in specs.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", "..", "logs"):
            raise ValueError(f"run name {name!r}: use letters, digits, '-', '_' or '.' (not 'logs')")
        _check_spec(spec)
        (out / name).mkdir(parents=True, exist_ok=True)
        runs.append((spec, out / name, (base_dirs or {}).get(name)))
    start = time.monotonic()
    _launch(out, _job(runs, timeout, fail_rank), worlds.pop(), timeout)
    wall = time.monotonic() - start
    return {name: _finish(out / name, wall) for name in specs}


def train_zero_stages(
    out_dir: str | Path,
    stages: tuple[int, ...] = (2, 3),
    spec: ZeroSpec = ZeroSpec(),
    *,
    base_dir: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[int, ZeroRun]:
    """``spec`` once per ZeRO stage, one launch, into ``out_dir/zero{stage}``."""
    specs = {f"zero{stage}": replace(spec, stage=stage) for stage in stages}
    if len(specs) != len(stages):
        raise ValueError(f"stages={stages!r}: pass distinct ZeRO stages, e.g. (2, 3)")
    runs = train_zero_many(out_dir, specs, base_dirs={name: base_dir for name in specs} if base_dir else None,
                           timeout=timeout)
    return {stage: runs[f"zero{stage}"] for stage in stages}


def train_zero(
    out_dir: str | Path,
    spec: ZeroSpec = ZeroSpec(),
    *,
    base_dir: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    fail_rank: int | None = None,
) -> ZeroRun:
    """Run ``spec`` under DeepSpeed in ``spec.world_size`` processes and write ``out_dir``."""
    _check_spec(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    _launch(out, _job([(spec, out, base_dir)], timeout, fail_rank), spec.world_size, timeout)
    return _finish(out, time.monotonic() - start)


def build_zero_many(
    specs: Mapping[str, ZeroSpec],
    cache_root: str | Path | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, ZeroRun]:
    """:func:`train_zero_many` once per cache key under ``cache_root`` (file-locked: safe under xdist).

    Also builds (or reuses) the matching exported base model directories of ``build_bundle``.
    """
    from .bundle import BundleSpec, build_base_dir, default_cache_root
    from .cache import cached_build

    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    base_dirs = {name: build_base_dir(BundleSpec(variant=spec.variant, dims=spec.dims, seed=spec.seed), cache_root)
                 for name, spec in specs.items()}
    params = {"runs": {name: spec.params() for name, spec in specs.items()},
              "base_dirs": {name: str(path) for name, path in base_dirs.items()},
              "deepspeed": _deepspeed_version()}

    def build(tmp: Path) -> None:
        train_zero_many(tmp, specs, base_dirs=base_dirs, timeout=timeout)

    root = cached_build(cache_root, "zero-runs", params, build)
    return {name: ZeroRun.open(root / name) for name in specs}


def build_zero_runs(
    stages: tuple[int, ...] = (2, 3),
    spec: ZeroSpec = ZeroSpec(),
    cache_root: str | Path | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[int, ZeroRun]:
    """Cached :func:`train_zero_stages`: ``{stage: ZeroRun}``."""
    runs = build_zero_many({f"zero{stage}": replace(spec, stage=stage) for stage in stages}, cache_root,
                           timeout=timeout)
    return {stage: runs[f"zero{stage}"] for stage in stages}


def build_zero_run(
    spec: ZeroSpec = ZeroSpec(),
    cache_root: str | Path | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> ZeroRun:
    """One cached run of ``spec``; see :func:`build_zero_many`."""
    return build_zero_many({f"zero{spec.stage}": spec}, cache_root, timeout=timeout)[f"zero{spec.stage}"]


def _deepspeed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return "absent"


# --------------------------------------------------------------------------- worker side


def _watchdog(parent_pid: int, timeout: float) -> None:
    """Exit hard if the parent goes away or the run overstays its deadline (no orphans)."""
    import threading

    deadline = time.monotonic() + timeout + 10

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid or time.monotonic() > deadline:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="zero-train-watchdog", daemon=True).start()


def _stub_muon() -> None:
    """Trap 3 (found here): ZeRO imports ``deepspeed.runtime.zero.muon.muon_optimizer`` (for an
    ``isinstance(opt, MuonWithAuxAdam)`` check in ``deepspeed.initialize``) and ``...muon.original_muon``
    (for ``muon_update``, called only for Muon optimizers, imported on every gradient reduction);
    both modules run ``torch.compile`` at import, which loads torch._inductor: 2-4 s per rank on 2
    cores. These runs use AdamW, so stand-ins answer the isinstance checks and the import; never
    do this in a process that trains with Muon."""
    import types

    import torch

    class MuonWithAuxAdam(torch.optim.Optimizer):  # never instantiated
        pass

    def muon_update(*args, **kwargs):
        raise RuntimeError("harness.synthetic.zero_train stubs DeepSpeed's Muon; it cannot train with Muon")

    for name, attrs in {
        "deepspeed.runtime.zero.muon.muon_optimizer": {"MuonWithAuxAdam": MuonWithAuxAdam},
        "deepspeed.runtime.zero.muon.original_muon": {"MuonWithAuxAdam": MuonWithAuxAdam,
                                                       "muon_update": muon_update},
    }.items():
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__dict__.update(attrs)
            sys.modules[name] = stub


def _save_config_sorted(out: Path) -> None:
    """Same normalisation as ``save_adapter``: sorted target_modules, sorted keys."""
    path = out / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _worker(job: dict) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _watchdog(job["parent_pid"], job["timeout"])

    def phase(name: str) -> None:
        since_launch = time.time() - job["launched_at"]
        print(f"[zero_train rank {rank}] {since_launch:7.2f} s after launch: {name}", file=sys.stderr, flush=True)

    phase("worker up")
    import importlib

    import torch

    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    # Trap 1 (REFERENCE.md 6): without this, init_distributed compiles a C++ shm extension.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    _stub_muon()
    deepspeed.init_distributed(dist_backend="gloo")
    phase("process group up")
    for run in job["runs"]:
        _train_one(run, job, rank, world, phase)
        dist.barrier()
    dist.destroy_process_group()
    phase("done")


def _train_one(run: dict, job: dict, rank: int, world: int, phase) -> None:
    import shutil

    import deepspeed
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from safetensors.torch import save_file

    from ..probes import make_probe
    from .adapters import official_lora_config
    from .family import build_model

    t0 = time.monotonic()
    spec = ZeroSpec.from_params(run["spec"])
    out = Path(run["out_dir"])
    stage = f"ZeRO-{spec.stage}" + (" bf16" if spec.bf16 else "")
    torch.manual_seed(spec.seed)  # identical LoRA init on every rank
    model = build_model(spec.variant, spec.dims, seed=spec.seed)
    model.requires_grad_(False)  # only the adapter trains, whatever PEFT's rule (<= 0.20 leaves Plora_* trainable)
    peft_model = get_peft_model(model, official_lora_config(r=spec.lora_r, lora_alpha=spec.lora_alpha))
    if run.get("base_dir"):
        peft_model.peft_config["default"].base_model_name_or_path = run["base_dir"]

    # Probe batches come from the unpartitioned embedding, before ZeRO-3 takes it apart.
    embedding = peft_model.get_input_embeddings()
    batches = [
        make_probe(embedding, batch_size=spec.micro_batch, seq_len=spec.seq_len,
                   seed=spec.seed * 1000 + step * world + rank)
        for step in range(spec.steps)
    ]
    reference_probe = make_probe(embedding, batch_size=2, seq_len=spec.seq_len, seed=REFERENCE_PROBE_SEED)

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr)  # Trap 2: a plain torch optimizer
    engine, *_ = deepspeed.initialize(model=peft_model, optimizer=optimizer, config=run["ds_config"])
    phase(f"{stage}: deepspeed.initialize done")
    torch.manual_seed(spec.seed * 7919 + rank)  # LoRA dropout, per rank, reproducible

    engine.train()
    losses = []
    dtype = torch.bfloat16 if spec.bf16 else torch.float32
    for batch in batches:
        labels = batch.input_ids.masked_fill(batch.im_mask, -100)
        loss = engine(**{**batch.model_kwargs(), "inputs_embeds": batch.inputs_embeds.to(dtype)}, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    t_train = time.monotonic()
    phase(f"{stage}: {len(losses)} steps, losses {losses}")

    # (a) the engine checkpoint, on every rank.
    ckpt = out / "checkpoint"
    engine.save_checkpoint(str(ckpt), tag=spec.tag)

    module = engine.module  # the PeftModel
    # (b) the naive save: rank 0 alone, parameters still partitioned under ZeRO-3.
    if rank == 0:
        module.save_pretrained(out / "adapter-naive")
    dist.barrier()

    # (c1) the right way: gather the adapter parameters on all ranks, rank 0 saves.
    adapter_params = [p for p in module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(adapter_params, modifier_rank=None):
        if rank == 0:
            module.save_pretrained(out / "adapter-gathered")
    dist.barrier()

    # (c2) the other right way: the consolidated state dict (a collective under ZeRO-3).
    if spec.stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = module.state_dict()
    if rank == 0:
        module.save_pretrained(out / "adapter-consolidated", state_dict=state_dict)
    del state_dict
    dist.barrier()

    # (d) reference outputs of the trained engine (every rank runs the forward; rank 0 keeps it).
    engine.eval()
    with torch.no_grad():
        kwargs = {**reference_probe.model_kwargs(), "inputs_embeds": reference_probe.inputs_embeds.to(dtype)}
        logits = engine(**kwargs).logits.float().cpu()
    phase(f"{stage}: checkpoint, adapters and reference logits saved")
    if rank == 0:
        save_file(
            {
                "input_ids": reference_probe.input_ids.contiguous(),
                "inputs_embeds": reference_probe.inputs_embeds.float().contiguous(),
                "im_mask": reference_probe.im_mask.contiguous(),
                "attention_mask": reference_probe.attention_mask.contiguous(),
                "logits": logits.contiguous(),
            },
            out / "reference.safetensors",
        )
        for name in ("adapter-naive", "adapter-gathered", "adapter-consolidated"):
            (out / name / "README.md").unlink(missing_ok=True)
            _save_config_sorted(out / name)
        shutil.copyfile(out / "adapter-gathered" / "adapter_config.json", ckpt / "adapter_config.json")
        manifest = {
            "spec": spec.params(),
            "tag": spec.tag,
            "stage": spec.stage,
            "world_size": world,
            "run_id": job["run_id"],
            "base_dir": run.get("base_dir"),
            "ds_config": run["ds_config"],
            "deepspeed": deepspeed.__version__,
            "torch": torch.__version__,
            "losses_rank0": losses,
            "rank0_s": {"train": round(t_train - t0, 2), "save": round(time.monotonic() - t_train, 2)},
            "dirs": {
                "checkpoint": "engine.save_checkpoint (+ adapter_config.json copied beside it)",
                "adapter-naive": "save_pretrained on rank 0 without gathering",
                "adapter-gathered": "save_pretrained inside deepspeed.zero.GatheredParameters(modifier_rank=None)",
                "adapter-consolidated": ("save_pretrained(state_dict=engine._zero3_consolidated_16bit_state_dict())"
                                         if spec.stage == 3 else "save_pretrained(state_dict=module.state_dict())"),
                "reference.safetensors": "rank-0 logits of the trained engine on a fixed probe batch",
            },
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    del engine, optimizer, module, peft_model, model


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="DeepSpeed ZeRO worker of harness.synthetic.zero_train")
    parser.add_argument("--worker", type=Path, required=True, help="job.json written by train_zero")
    parser.add_argument("--run-id", required=True, help="marks this run's processes")
    args = parser.parse_args(argv)
    _worker(json.loads(args.worker.read_text()))
    # Everything is written and closed: skip the interpreter teardown of torch/deepspeed (1-3 s).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
