"""finetune_vla.py — phase 4: fine-tune pi0 (transformers.PI0ForConditionalGeneration) on human, RL or mixed data.

pi0 (Black et al. 2024) reads both camera images, the task instruction and the 8-d state, and predicts a chunk of
50 actions with a flow-matching action expert; the loss is the model's own (``forward(actions=...)``):
|| v_theta(x_tau, tau) - (noise - actions) ||^2 with x_tau = tau noise + (1 - tau) actions. Data follow OpenVLA's
preprocessing: no-op steps dropped, images turned upright and resized with padding to 224, raw 7-d actions;
state and actions are normalised by mean/std computed from the training data and saved with the checkpoint.
Listing several data roots mixes sources (the paper's "human + RL"). The data pipeline (preprocessing, the streaming
dataset, the rollout policy of evaluate.py and collect.py) is vla_data.py; this file: the model and the training loop.

    # GPU (one node, 8 GPUs): download lerobot/pi0_base once, then
    torchrun --nproc-per-node 8 finetune_vla.py --model-path /models/pi0_base --data data/diffusion_rl --exp-name rl
    # CPU smoke run: a randomly initialised tiny pi0 (not a VLA: nothing pretrained), labelled as such
    python finetune_vla.py --config-only tiny --data data/scripted --total-steps 20 --batch-size 2
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
import tyro

import demo_hdf5
from vla_data import TrajectoryDataset, collate, find_files, load_stats, prepare_tokenizer, save_stats, training_batch


@dataclass
class Args:
    exp_name: str = "pi0"
    """name of the experiment: runs/finetune_vla/<exp_name>__seed<S>/"""
    seed: int = 0
    """seed of the run"""
    cuda: bool = True
    """train on CUDA when available"""
    track: bool = False
    """log to wandb (metrics.jsonl is always written)"""
    wandb_project_name: str = "diffusion-rl-libero"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team)"""

    # model
    model_path: str = "lerobot/pi0_base"
    """hub id or local directory of a pretrained PI0ForConditionalGeneration (with its tokenizer)"""
    config_only: Optional[Literal["tiny", "small"]] = None
    """build a randomly initialised model from a named small config instead (smoke tests, CPU demos)"""
    tokenizer_path: Optional[str] = None
    """tokenizer directory (default: --model-path; with --config-only: a word-level one built from the data)"""
    freeze_vision: bool = False
    """freeze the SigLIP vision tower"""
    freeze_vlm: bool = False
    """freeze the whole VLM (PaliGemma); only the action expert trains"""

    # data
    data: tuple[str, ...] = ("data/diffusion_rl",)
    """HDF5 files, directories (searched recursively) or globs; several are mixed (e.g. data/human data/diffusion_rl)"""
    suites: Optional[tuple[str, ...]] = None
    """keep only these suites (e.g. libero_90 for the OOD experiment)"""
    task_names: Optional[tuple[str, ...]] = None
    """keep only these tasks (LIBERO task names)"""
    image_size: int = 224
    """images are resized with padding to this (pi0's SigLIP input)"""
    chunk_size: int = 50
    """actions per predicted chunk"""
    filter_noops: bool = True
    """drop no-op steps (OpenVLA's rule, demo_hdf5.noop_mask)"""
    instruction: Literal["benchmark", "bddl"] = "benchmark"
    """prompt text: LIBERO's file-name-derived task.language (OpenVLA's, openpi's and LeRobot's training and
    evaluation text, as in the public LIBERO training sets) or the BDDL :language the demo files store. Recorded
    in the checkpoint; evaluate.py prompts with the same"""
    num_workers: int = 2
    """DataLoader workers (each opens its own HDF5 handles)"""

    # optimisation (openpi's LIBERO recipe)
    total_steps: int = 30_000
    """optimiser steps"""
    batch_size: int = 32
    """global batch size (split over processes; times --grad-accum micro-batches)"""
    grad_accum: int = 1
    """micro-batches accumulated per optimiser step"""
    lr: float = 2.5e-5
    """peak learning rate"""
    lr_min: float = 2.5e-6
    """final learning rate of the cosine decay"""
    warmup_steps: int = 1_000
    """linear warm-up steps"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """max gradient norm"""
    bf16: bool = True
    """bf16 autocast on CUDA"""
    ema_decay: float = 0.0
    """EMA of the weights (0 disables; e.g. 0.999)"""
    fsdp: bool = False
    """shard parameters with FSDP2 (torch.distributed.fsdp.fully_shard) instead of DDP"""
    num_inference_steps: int = 10
    """flow-matching integration steps at inference"""

    # run
    run_root: str = "runs"
    """root of runs/finetune_vla/<exp_name>__seed<S>/"""
    resume: str = "auto"
    """auto: continue from checkpoints/latest if present; never; or a checkpoint directory"""
    log_every: int = 50
    """steps between metrics lines"""
    save_every: int = 1_000
    """steps between checkpoints/latest"""


# ================================================================================================================
# Models
# ================================================================================================================
def named_config(name: str, vocab_size: int, image_size: int, chunk_size: int):
    """Randomly initialised pi0 of a given size. 'tiny': 2-layer 64-d Gemma/SigLIP (seconds on a CPU);
    'small': 4-layer 256-d (a CPU demo that can fit a few tasks). Neither is a vision-language model."""
    from transformers import PI0Config

    width, layers, patch = {"tiny": (64, 2, 16), "small": (256, 4, 16)}[name]
    return PI0Config(
        vlm_config={
            "model_type": "paligemma",
            "text_config": {
                "model_type": "gemma",
                "hidden_size": width,
                "num_hidden_layers": layers,
                "intermediate_size": 2 * width,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": width // 2,
                "vocab_size": vocab_size,
            },
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": width,
                "intermediate_size": 2 * width,
                "num_hidden_layers": layers,
                "num_attention_heads": 2,
                "patch_size": patch,
                "image_size": image_size,
                "vision_use_head": False,
            },
            "projection_dim": width,
            "image_token_id": vocab_size - 1,
        },
        dit_config={
            "model_type": "gemma",
            "hidden_size": width,
            "num_hidden_layers": layers,
            "intermediate_size": 2 * width,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": width // 2,
        },
        chunk_size=chunk_size,
    )


def word_tokenizer(instructions: list[str]):
    """A word-level tokenizer over the instructions (``tokenizers`` library), for randomly initialised models:
    special tokens <pad>, <bos>, <eos>, <unk>, and <image> last (its id is the config's image_token_id)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in instructions for w in text.lower().split()})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words, "\n"])}
    vocab["<image>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    return fast


def load_model(args, instructions: list[str]):
    """(model, tokenizer) from --model-path or --config-only; one clear sentence if the model is missing offline."""
    from transformers import AutoTokenizer, PI0ForConditionalGeneration

    if args.config_only:
        tokenizer = (
            AutoTokenizer.from_pretrained(args.tokenizer_path) if args.tokenizer_path else word_tokenizer(instructions)
        )
        config = named_config(args.config_only, len(tokenizer), args.image_size, args.chunk_size)
        print(
            f"model: RANDOMLY INITIALISED pi0 '{args.config_only}' config (--config-only): a smoke-test model, "
            "not a pretrained VLA"
        )
        model = PI0ForConditionalGeneration(config)
        return model, prepare_tokenizer(tokenizer, model)
    try:
        model = PI0ForConditionalGeneration.from_pretrained(args.model_path)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)
    except OSError:
        raise FileNotFoundError(
            f"pi0 model '{args.model_path}' is not available here; download it where there is internet "
            f"(huggingface-cli download {args.model_path} --local-dir <dir>), pass --model-path <dir>, "
            "or use --config-only tiny for a smoke run."
        ) from None
    if model.config.chunk_size != args.chunk_size:
        raise ValueError(f"--chunk-size {args.chunk_size} differs from the model's {model.config.chunk_size}.")
    return model, prepare_tokenizer(tokenizer, model)


# ================================================================================================================
# Training
# ================================================================================================================
def lr_factor(step: int, args) -> float:
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.total_steps - args.warmup_steps))
    return (args.lr_min + (args.lr - args.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))) / args.lr


def freeze(model, freeze_vision: bool, freeze_vlm: bool) -> None:
    """The user's freeze flags, and the parameters pi0's training forward never uses, which are frozen so that
    DDP neither fails on them nor all-reduces them every step (checked against a backward pass in the tests):

    * the action expert's token embedding (``model.dit.embed_tokens``): the expert is fed ``inputs_embeds``;
    * the VLM's final norm and, in its last layer, the query and output projections, the MLP and the
      post-attention norm: the VLM's output is only its KV cache, and of the last layer only the keys and values
      (and the input norm before them) reach the action expert.
    """
    lm = model.model.vlm.language_model
    last = lm.layers[-1]
    for module in (model.model.dit.embed_tokens, lm.norm, last.self_attn.q_proj, last.self_attn.o_proj, last.mlp,
                   last.post_attention_layernorm):  # fmt: skip
        module.requires_grad_(False)
    if freeze_vlm:
        model.model.vlm.requires_grad_(False)
    elif freeze_vision:
        model.model.vlm.vision_tower.requires_grad_(False)


def shard(model, device: torch.device) -> None:
    """FSDP2: one unit per transformer layer, the rest in the root unit. The VLM's last layer stays in the root:
    its hidden-state output is unused (only its keys and values reach the expert), so the pre-backward hook that
    would re-gather a resharded layer never fires, and its key/value projections' backward found freed weights.
    The mesh is built on the training device's type: FSDP's default mesh is CUDA's wherever CUDA exists, which
    would put a --no-cuda run's ranks on GPUs."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    # FSDP2 warns that the root returns views (the loss, the logits): harmless here, nothing modifies them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for layer in [*model.model.vlm.language_model.layers[:-1], *model.model.dit.layers]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches of every global batch, so that the data seen at each optimiser step depend on
    the seed and the step only, not on the number of processes or on where a run was resumed.

    Global batch ``s`` is ``batch_size`` indices of the epoch's permutation (seeded by ``seed + epoch``; the last
    partial batch of an epoch is dropped); process ``rank`` takes its contiguous share and cuts it into
    ``grad_accum`` micro-batches. :meth:`positions` gives the position of each sample in the global batch.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, grad_accum: int, seed: int, start_step: int):
        self.n, self.B, self.world, self.rank, self.accum = n, batch_size, world, rank, grad_accum
        self.seed, self.start_step, self.steps_per_epoch = seed, start_step, n // batch_size
        self.micro = batch_size // (world * grad_accum)

    def positions(self, micro_index: int) -> slice:
        start = (self.rank * self.accum + micro_index) * self.micro
        return slice(start, start + self.micro)

    def __iter__(self):
        step, perm, perm_epoch = self.start_step, None, -1
        while True:
            epoch, within = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = (
                    torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)),
                    epoch,
                )
            batch = perm[within * self.B : (within + 1) * self.B]
            for a in range(self.accum):
                yield batch[self.positions(a)].tolist()
            step += 1


def flow_noise(config, batch_size: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pi0's training draws for a whole global batch, seeded by (seed, step): flow-matching time (Beta, as pi0's
    own forward draws it) and noise. Each process slices its share, so that the draws do not depend on how many
    processes share the batch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + step)
        beta = torch.distributions.Beta(config.time_sampling_beta_alpha, config.time_sampling_beta_beta)
        time = beta.sample((batch_size,)) * config.time_sampling_scale + config.time_sampling_offset
        noise = torch.randn(batch_size, config.chunk_size, config.max_action_dim)
    return time.float(), noise


def full_state(model, tensors=None) -> dict:
    """The full (unsharded) CPU state dict of ``model``, or of ``tensors`` (name -> tensor, e.g. the EMA) laid out
    like its parameters. Collective under FSDP: every process calls it."""
    from torch.distributed.tensor import DTensor

    source = model.state_dict() if tensors is None else tensors
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in source.items()}


def save(ckpt_dir: str, model, model_state: dict, tokenizer, stats, state: dict, optim: dict, info: dict) -> None:
    """``<ckpt_dir>`` = the model in the HF format (``model/``: config, weights, tokenizer), norm_stats.json,
    train_info.json, the training state (step, scheduler, EMA, RNG, freeze flags) in training_state.pt and the
    optimiser state (full, keyed by parameter name) in optimizer.pt; written to a temp dir and renamed."""
    import shutil

    import run_utils

    tmp = ckpt_dir.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers import PI0ForConditionalGeneration

    # a plain (not FSDP-wrapped) model class writes the weights, so transformers maps the names the same way for
    # every launch mode; a meta-device skeleton costs no memory, the weights are ``model_state``
    with torch.device("meta"):
        skeleton = PI0ForConditionalGeneration(model.config)
    skeleton.save_pretrained(os.path.join(tmp, "model"), state_dict=model_state)
    tokenizer.save_pretrained(os.path.join(tmp, "model"))
    save_stats(os.path.join(tmp, "norm_stats.json"), stats)
    run_utils.write_json(os.path.join(tmp, "train_info.json"), info)
    run_utils.save_checkpoint(os.path.join(tmp, "training_state.pt"), state)
    run_utils.save_checkpoint(os.path.join(tmp, "optimizer.pt"), optim)
    old = ckpt_dir.rstrip("/") + ".old"
    if os.path.exists(ckpt_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def check_args(args, world: int, distributed: bool) -> None:
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by processes x --grad-accum "
                         f"({world * args.grad_accum}).")  # fmt: skip
    if args.fsdp and not distributed:
        raise ValueError("--fsdp shards over the processes of a torchrun launch: run it under torchrun.")


if __name__ == "__main__":
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from tqdm import tqdm

    import run_utils

    args = tyro.cli(Args)
    distributed = "RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        check_args(args, world, distributed)
    except ValueError as e:
        sys.exit(f"error: {e}")
    gpus, per_node = torch.cuda.device_count() if args.cuda else 0, int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if distributed and gpus and per_node > gpus:  # one GPU per process: more would fail deep in NCCL or FSDP
        sys.exit(f"error: {per_node} processes per node but {gpus} GPU(s) here; launch at most {gpus} per node "
                 "(torchrun --nproc-per-node) or train on the CPU with --no-cuda.")  # fmt: skip
    if distributed:
        dist.init_process_group("nccl" if args.cuda and torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if args.cuda and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    micro = args.batch_size // (world * args.grad_accum)
    run_dir = os.path.join(args.run_root, "finetune_vla", f"{args.exp_name}__seed{args.seed}")
    ckpt_root = os.path.join(run_dir, "checkpoints")
    resume = (
        None if args.resume == "never" else os.path.join(ckpt_root, "latest") if args.resume == "auto" else args.resume
    )
    resuming = resume is not None and os.path.exists(os.path.join(resume, "training_state.pt"))
    run_utils.seed_everything(args.seed, deterministic=False)  # before the model: every process builds the same
    try:
        if args.resume not in ("auto", "never") and not resuming:
            raise ValueError(
                f"--resume {args.resume} holds no training_state.pt; pass auto, never or a checkpoint dir."
            )
        paths = find_files(args.data, args.suites, args.task_names)
        dataset = TrajectoryDataset(paths, args.chunk_size, args.filter_noops, args.instruction)
        if len(dataset) < args.batch_size:
            raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(dataset)} samples of the data.")
        state = None
        if resuming:  # the model, tokenizer and statistics of the checkpoint, with the run's freeze flags
            from transformers import AutoTokenizer, PI0ForConditionalGeneration

            state = run_utils.load_checkpoint(os.path.join(resume, "training_state.pt"), ("finetune_vla/v1",))
            if state.get("instruction", "bddl") != args.instruction:
                raise ValueError(f"{resume} was trained with --instruction {state.get('instruction', 'bddl')}; "
                                 "resume with the same or start a new run (--exp-name or --resume never).")  # fmt: skip
            saved = state.get("freeze", {"freeze_vision": False, "freeze_vlm": False})
            if saved != {"freeze_vision": args.freeze_vision, "freeze_vlm": args.freeze_vlm}:
                raise ValueError(f"{resume} was trained with {saved}; resume with the same --freeze-vision/"
                                 "--freeze-vlm flags or start a new run (--exp-name or --resume never).")  # fmt: skip
            model = PI0ForConditionalGeneration.from_pretrained(os.path.join(resume, "model"))
            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(os.path.join(resume, "model")), model)
            stats = load_stats(os.path.join(resume, "norm_stats.json"))
        else:
            model, tokenizer = load_model(args, dataset.instructions)
            stats = dataset.stats
    except (FileNotFoundError, ValueError, demo_hdf5.TrajectoryFileError, run_utils.CheckpointError) as e:
        sys.exit(f"error: {e}")
    step = state["step"] if state else 0
    if rank == 0:
        print(f"data: {len(paths)} files, {len(dataset.entries)} demos, {len(dataset)} samples; {world} process(es), "
              f"micro-batch {micro} x {args.grad_accum} accumulation{', FSDP' if args.fsdp else ''}")  # fmt: skip
    freeze(model, args.freeze_vision, args.freeze_vlm)
    model.to(device)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    train_model = model
    if distributed and args.fsdp:
        shard(model, device)  # parameters become DTensor shards in place
    elif distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=args.betas, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args))
    # EMA of the trainable weights, laid out as the weights (sharded like them under FSDP)
    ema = {n: p.detach().clone() for n, p in zip(names, params)} if args.ema_decay > 0 else None
    # process 0 reads the full optimiser state and broadcasts it (sharded under FSDP): one copy in host memory
    full_options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=distributed)
    if resuming:
        if os.path.exists(os.path.join(resume, "optimizer.pt")):
            optim_state = torch.load(os.path.join(resume, "optimizer.pt"), weights_only=True) if rank == 0 else {}
            set_optimizer_state_dict(model, optimizer, optim_state, options=full_options)
        elif state.get("optimizer") and not args.fsdp:  # written before optimizer.pt existed (same parameter order)
            optimizer.load_state_dict(state["optimizer"])
        elif rank == 0:
            print(f"warning: {resume} holds no optimiser state; AdamW's moments restart from zero")
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            from torch.distributed.tensor import DTensor, distribute_tensor

            for n, t in ema.items():
                saved = state["ema"][n].to(device)
                t.copy_(distribute_tensor(saved, t.device_mesh, t.placements) if isinstance(t, DTensor) else saved)
        run_utils.set_rng_state(state["rng"])
        if rank == 0:
            print(f"resumed from {resume} at step {step}")
    info = {
        "exp_name": args.exp_name,
        "data": list(args.data),
        "files": paths,
        "suites": sorted({p.split(os.sep)[-2] for p in paths}),
        "image_size": args.image_size,
        "chunk_size": args.chunk_size,
        "config_only": args.config_only,
        "model_path": None if args.config_only else args.model_path,
        "instruction": args.instruction,
    }
    logger = None
    if rank == 0:
        run_utils.write_json(os.path.join(run_dir, "args.json"), asdict(args))
        logger = run_utils.MetricsLogger(run_dir, asdict(args), args.track, args.wandb_project_name,
                                         args.wandb_entity, args.exp_name)  # fmt: skip
    batches = GlobalBatchSampler(len(dataset), args.batch_size, world, rank, args.grad_accum, args.seed, step)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=args.num_workers, collate_fn=collate,
        persistent_workers=args.num_workers > 0,
    )  # fmt: skip
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    preemption = run_utils.Preemption()

    def checkpoint(name: str) -> None:
        """Collective: every process joins the gathers; process 0 writes."""
        model_state = full_state(model)
        if ema is not None:
            ema_full = full_state(model, ema)
            if name == "final":  # the evaluation model is the EMA
                model_state = {**model_state, **ema_full}
        optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))  # fmt: skip
        if rank == 0:
            state = {"format": "finetune_vla/v1", "scheduler": scheduler.state_dict(), "step": step,
                     "args": asdict(args), "rng": run_utils.rng_state(), "ema": ema_full if ema is not None else None,
                     "freeze": {"freeze_vision": args.freeze_vision, "freeze_vlm": args.freeze_vlm},
                     "instruction": args.instruction}  # fmt: skip
            save(os.path.join(ckpt_root, name), model, model_state, tokenizer, stats, state, optim,
                 {**info, "step": step})  # fmt: skip
        if distributed:
            dist.barrier()

    bar = tqdm(total=args.total_steps, initial=step, desc="pi0", unit="step", disable=rank != 0)
    data_iter, t_log = iter(loader), time.time()
    loss_sum, n_logged = torch.zeros((), device=device), 0
    train_model.train()
    while step < args.total_steps:
        time_g, noise_g = flow_noise(model.config, args.batch_size, args.seed, step)
        for a in range(args.grad_accum):
            batch = next(data_iter)
            inputs = {
                k: v.to(device) for k, v in training_batch(model, tokenizer, stats, batch, args.image_size).items()
            }
            share = batches.positions(a)
            inputs["timestep"], inputs["noise"] = time_g[share].to(device), noise_g[share].to(device)
            # gradients are reduced across processes on the last micro-batch only
            last = a == args.grad_accum - 1
            if distributed and args.fsdp:
                model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or not (distributed and not args.fsdp) else train_model.no_sync()
            with sync:
                with autocast:
                    loss = train_model(**inputs).loss / args.grad_accum
                loss.backward()
            loss_sum += loss.detach().float()
        n_logged += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for n, p in zip(names, params):
                    ema[n].lerp_(p.detach(), 1 - args.ema_decay)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.total_steps:
            if distributed:  # the global batch's loss: the mean over processes
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            mean_loss = loss_sum.item() / n_logged
            if rank == 0:
                samples_per_s = n_logged * args.batch_size / (time.time() - t_log)
                logger.log(step, loss=mean_loss, grad_norm=float(grad_norm), lr=scheduler.get_last_lr()[0],
                           samples_per_s=samples_per_s)  # fmt: skip
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            t_log, loss_sum, n_logged = time.time(), torch.zeros((), device=device), 0
        stop = preemption.requested
        if distributed:  # every process stops at the same step (checkpointing is collective)
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if step % args.save_every == 0 or stop:
            checkpoint("latest")
        if stop:  # process 0 requeues the SLURM job (if any) and says so; the others just leave
            preemption.exit() if rank == 0 else sys.exit(0)
    bar.close()
    checkpoint("latest")
    checkpoint("final")
    if rank == 0:
        logger.close()
        print(f"done: {step} steps; checkpoint in {os.path.join(ckpt_root, 'final')}")
    if distributed:
        dist.destroy_process_group()
