"""Training the testbed model from scratch on scenes drawn on the fly, in three phases.

A decoder trained from scratch at this size learns to look things up among 144 visual tokens only slowly when it
also has to learn what the tokens mean, and a random vision tower gives it nothing to look up. The recipe
therefore separates the two problems (the way LLaVA's first stage aligns the projector to word embeddings):

1. **symbolic** (`symbolic_steps`): the decoder learns every question family on *symbolic* visual tokens: the
   token of a patch painted by an object is the sum of the decoder's own word embeddings of its colour and
   shape, the token of a background patch a learned "nothing" vector, each plus a learned vector for the
   patch's place in the grid. The vision tower does not run.
2. **tower** (`tower_steps`): the vision tower and projector learn to map the rendered image to those symbolic
   tokens (mean squared error per patch); the decoder is frozen and does not run.
3. **joint** (`joint_steps`): the whole model, end to end on the rendered images, on the answer loss plus the
   per-patch loss of phase 2 (so the tokens stay what the decoder learned to read).

Each step draws fresh scenes (seeded by (seed, step, row), so a resumed run sees exactly the batches it would have
seen) and asks several questions about each image. The questions of one image share a single copy of its prompt
prefix, `<s> USER: <image>x144`: each question block attends to that prefix and to itself only, and its positions
restart right after the prefix, so every block is computed exactly as if it were the only question (the way
evaluation asks it). During the first `place_until` steps of phase 1, `place_rows` more image rows each show a
single object, with the background hidden, and ask where it is: that is where the decoder learns to read a place
out of a visual token, which it does not learn among several objects, where reading a place and finding the object
must both exist before either is rewarded. A few rows per step carry questions without any image (`USER: {question}
ASSISTANT:`): they define what the model answers when the image is removed (the blind control) and can only teach
it what the question implies.

The answer loss is cross-entropy on the answer tokens and the closing </s>, plus, early in phase 1, an
early-answer loss (the first answer token predicted at every question token from the first colour or shape
word on), which rewards looking the named object up as soon as it is named. AdamW with a warmup and cosine decay
in every phase, gradient clipping at 1. Decoder weights start at std fan_in**-0.5 rather than Hugging Face's
0.02, and word embeddings at std 1: at 0.02 the small decoder stays at chance for hundreds of steps. Every `log_every` steps one line goes to
log.jsonl (loss, teacher-forced answer accuracy per family, learning rate, elapsed time); in phase 3 and at its
start a greedy evaluation on a small held-out set is logged every `eval_every` steps. The training state is
saved every `save_every` steps (train_state.pt) and `resume` continues from it. At the end the model is
exported as a Hugging Face folder (weights, config, tokenizer, processor) and the curve is plotted to
curve.png.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from visroute.testbed.data import make_items
from visroute.testbed.modeling import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, build_model, build_processor, pixel_values
from visroute.testbed.questions import FAMILIES, TEMPLATES, answer_of, ask
from visroute.testbed.scenes import ALL_COLORS, GRID, PLURALS, PRIOR_SHAPES, SHAPES, object_tokens, random_scene, render

IGNORE = -100
PHASES = ("symbolic", "tower", "joint")


@dataclass
class TrainConfig:
    out: str = "runs/testbed"
    symbolic_steps: int = 3200
    tower_steps: int = 300
    joint_steps: int = 600
    images: int = 8  # images per step
    questions: tuple[str, ...] = FAMILIES + ("attribute", "attribute", "existence", "grounding", "grounding",
                                             "relation", "counting")  # asked of every image
    text_rows: int = 1  # rows of image-free questions per step (phases 1 and 3)
    text_questions: int = 16  # questions per image-free row
    # Phase 1 schedule, in symbolic steps: (from step, question families added). Attribute questions alone
    # first: mixed with the other families from the start, the decoder stays at chance far longer.
    unlock: tuple = ((0, ("attribute",)), (250, ("existence", "grounding", "blind_solvable")),
                     (450, ("counting", "relation")))
    text_from: int = 250  # symbolic step from which the image-free rows join (ask only unlocked families)
    curriculum: int = 0  # symbolic steps over which scenes grow from 1 object to the full 3..6 (0: none)
    reveal: int = 400  # symbolic steps over which the questions come to see the background tokens
    place_rows: int = 12  # extra image rows per step of one object and one "where" question (see place_rows)
    place_until: int = 400  # ... during the first this many symbolic steps
    early: float = 0.5  # weight of the early-answer loss at the start of phase 1, falling linearly to 0 ...
    early_until: float = 0.6  # ... at this share of phase 1
    lr: float = 1e-3  # phases 1 and 2
    joint_lr: float = 3e-4
    patch_weight: float = 1.0  # weight of the per-patch loss in phase 3
    min_lr_ratio: float = 0.05
    warmup: int = 50  # steps of linear warmup at the start of each phase
    weight_decay: float = 0.05
    size: str = "small"
    seed: int = 0
    threads: int = 2
    log_every: int = 10
    eval_every: int = 100
    eval_items: int = 120
    save_every: int = 100

    @property
    def steps(self) -> int:
        return self.symbolic_steps + self.tower_steps + self.joint_steps

    def phase(self, step: int) -> tuple[str, int, int]:
        """(phase name, step within the phase, length of the phase) of global step `step`."""
        for name, n in zip(PHASES, (self.symbolic_steps, self.tower_steps, self.joint_steps)):
            if step < n:
                return name, step, n
            step -= n
        raise ValueError("step past the end of training")


class _Tok:
    """Word ids of questions and answers (cached: the vocabulary and the question forms are small)."""

    def __init__(self):
        self.tok = build_processor().tokenizer
        self._cache: dict[str, list[int]] = {}
        self.user = self.ids("USER:")

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def block(self, question: str, answer: str) -> tuple[list[int], list[int], list[int]]:
        """Token ids of `{question} ASSISTANT: {answer}</s>`, their next-token labels (answer and </s>), and the
        early-answer labels: the first answer token at every question token from the first word that names a
        colour or shape up to ASSISTANT (see TrainConfig.early)."""
        q = self.ids(f"{question} ASSISTANT:")
        a = self.ids(answer) + [EOS_ID]
        first = next((i for i, t in enumerate(q) if t in self.names), len(q) - 1)
        early = [IGNORE] * first + [a[0]] * (len(q) - 1 - first) + [IGNORE] * (len(a) + 1)
        return q + a, [IGNORE] * (len(q) - 1) + a + [IGNORE], early

    @functools.cached_property
    def names(self) -> set[int]:
        words = list(ALL_COLORS) + list(SHAPES) + sorted(PRIOR_SHAPES) + [PLURALS[x] for x in SHAPES]
        return {self.ids(w)[0] for w in words}


def _pack(prefixes: list[list[int]], blocks: list[list[tuple[list[int], list[int], list[int], str]]]):
    """Right-padded packed rows: ids, positions, block index (0 = prefix, -1 = padding), labels, early-answer
    labels, and the family of each labelled position."""
    rows = []
    for prefix, bl in zip(prefixes, blocks):
        n0 = len(prefix)
        ids, pos, blk, lab, early, fam = list(prefix), list(range(n0)), [0] * n0, [IGNORE] * n0, [IGNORE] * n0, [""] * n0
        for k, (b_ids, b_lab, b_early, family) in enumerate(bl, start=1):
            ids += b_ids
            pos += range(n0, n0 + len(b_ids))
            blk += [k] * len(b_ids)
            lab += b_lab
            early += b_early
            fam += [family if x != IGNORE else "" for x in b_lab]
        rows.append((ids, pos, blk, lab, early, fam))
    length = max(len(r[0]) for r in rows)
    n = len(rows)
    out = [torch.full((n, length), PAD_ID), torch.zeros((n, length), dtype=torch.long), torch.full((n, length), -1),
           torch.full((n, length), IGNORE), torch.full((n, length), IGNORE)]
    fams = []
    for i, row in enumerate(rows):
        for t, values in zip(out, row[:5]):
            t[i, :len(values)] = torch.tensor(values)
        fams.append(row[5] + [""] * (length - len(row[5])))
    return (*out, fams)


HIDDEN = -2  # block index of prefix tokens the question blocks do not see (see background_visible)


def block_mask(blk: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: causal; the prefix sees the prefix; a question block sees the visible prefix tokens
    (block 0, not HIDDEN) and itself; padding sees itself."""
    n = blk.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    key, query = blk[:, None, :], blk[:, :, None]
    in_prefix = lambda b: (b == 0) | (b == HIDDEN)  # noqa: E731
    allowed = (in_prefix(key) & in_prefix(query)) | ((query >= 1) & ((key == 0) | (key == query)))
    allowed = causal[None] & allowed
    allowed |= torch.eye(n, dtype=torch.bool)[None]
    return allowed[:, None]


def background_visible(cfg: TrainConfig, step: int) -> float:
    """Share of the background visual tokens the questions may attend to at `step`: none when phase 1 starts,
    all once `cfg.reveal` of its steps are done, and in the later phases. Object tokens (of every object, asked
    about or not) are always visible. A decoder learning from scratch finds the few informative tokens among
    144 only slowly; this lets it first learn to read objects, then to ignore the background."""
    name, d, _ = cfg.phase(step)
    if name != "symbolic" or cfg.reveal <= 0:
        return 1.0
    return min(1.0, d / cfg.reveal)


def place_rows(cfg: TrainConfig, step: int) -> int:
    """Extra rows at `step` that each show one object, with the background hidden, and ask where it is. Reading a
    place out of the visual tokens and looking an object up among several are learned together only very
    slowly (neither gives a gradient signal before the other exists); on a lone object the readout forms
    within a few hundred steps, and the lookup then has something to serve."""
    name, d, _ = cfg.phase(step)
    return cfg.place_rows if name == "symbolic" and d < cfg.place_until else 0


def scene_sizes(cfg: TrainConfig, step: int) -> tuple[int, int]:
    """(fewest, most) objects of an ordinary scene at `step`: one object at first, then more, up to 3..6 once
    the curriculum is over (questions may still add or remove objects)."""
    name, d, _ = cfg.phase(step)
    if name != "symbolic" or cfg.curriculum <= 0 or d >= cfg.curriculum:
        return 3, 6
    most = 1 + (5 * d) // cfg.curriculum
    return min(3, most), most


def unlocked(cfg: TrainConfig, step: int) -> set[str]:
    """The question families asked at `step`: in phase 1 those of `cfg.unlock` whose step has come, then all."""
    name, d, _ = cfg.phase(step)
    return {f for start, fams in cfg.unlock if name != "symbolic" or d >= start for f in fams}


def text_rows(cfg: TrainConfig, step: int) -> int:
    """Image-free rows at `step` (none in phase 2, none in phase 1 before `cfg.text_from`)."""
    name, d, _ = cfg.phase(step)
    return 0 if name == "tower" or (name == "symbolic" and d < cfg.text_from) else cfg.text_rows


def make_batch(cfg: TrainConfig, step: int, tok: _Tok):
    """The packed image rows and image-free rows of training step `step` (a pure function of seed and step)."""
    image_prefix = [BOS_ID] + tok.user + [IMAGE_ID] * (GRID * GRID)
    families = unlocked(cfg, step)
    asked = [f for f in cfg.questions if f in families]
    forms = {t for f in families for t in TEMPLATES[f]}
    images, img_blocks, patch_labels = [], [], []

    def add_image(objs, questions, background_seed):
        images.append(render(objs, background_seed))
        patch_labels.append(_patch_labels(objs))
        img_blocks.append([(*tok.block(q.text, answer_of(q, objs)), q.family) for q in questions])

    for row in range(cfg.images):
        rng = random.Random(f"visroute-train:{cfg.seed}:{step}:{row}")
        background_seed = rng.getrandbits(32)
        fams = [asked[i % len(asked)] for i in range(len(cfg.questions))]
        rng.shuffle(fams)
        questions, objs = ask(rng, random_scene(rng, *scene_sizes(cfg, step)), fams, templates=forms)
        add_image(objs, questions, background_seed)
    for row in range(place_rows(cfg, step)):
        rng = random.Random(f"visroute-train-place:{cfg.seed}:{step}:{row}")
        background_seed = rng.getrandbits(32)
        questions, objs = ask(rng, [], ["grounding"])
        add_image(objs, questions, background_seed)
    n_text = text_rows(cfg, step)
    text_blocks = []
    for row in range(n_text):
        rng = random.Random(f"visroute-train-text:{cfg.seed}:{step}:{row}")
        bl = []
        while len(bl) < cfg.text_questions:
            questions, objs = ask(rng, random_scene(rng), [rng.choice(sorted(families))])
            bl += [(*tok.block(q.text, answer_of(q, objs)), q.family) for q in questions]
        text_blocks.append(bl)
    ids, pos, blk, lab, early, fams = _pack([image_prefix] * len(images), img_blocks)
    labels = torch.stack(patch_labels)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    hide = (labels[..., 0] == 0) & (torch.rand(labels.shape[:2], generator=g) >= background_visible(cfg, step))
    hide[cfg.images:] = labels[cfg.images:, :, 0] == 0  # the place rows never see the background
    first = len(image_prefix) - GRID * GRID
    blk[:, first:first + GRID * GRID][hide] = HIDDEN
    batch = {"image": (ids, pos, blk, lab, early, fams, pixel_values(images), labels)}
    if n_text:
        batch["text"] = (*_pack([[BOS_ID] + tok.user] * n_text, text_blocks), None, None)
    return batch


COLOR_IDS = {c: i + 1 for i, c in enumerate(ALL_COLORS)}  # 0: no object
SHAPE_IDS = {s: i + 1 for i, s in enumerate(list(SHAPES) + sorted(PRIOR_SHAPES))}


def _patch_labels(objs) -> torch.Tensor:
    """(GRID*GRID, 2) colour id and shape id of the object painting each patch (0 where there is none)."""
    lab = torch.zeros(GRID * GRID, 2, dtype=torch.long)
    for o in objs:
        toks = object_tokens(o)
        lab[toks, 0] = COLOR_IDS[o.color]
        lab[toks, 1] = SHAPE_IDS[o.shape]
    return lab


def init_weights(model) -> None:
    """Re-draw the decoder's and projector's matrices with std fan_in**-0.5 and the word embeddings with std 1
    (see the module docstring): the residual stream then starts at the scale the layers write to it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("language_model.layers" in name or "multi_modal_projector" in name):
                p.normal_(0.0, p.shape[1] ** -0.5)
        model.get_input_embeddings().weight.normal_(0.0, 1.0)


class SymbolicTokens(torch.nn.Module):
    """The visual tokens the decoder learns on in phase 1 and the tower learns to produce in phases 2 and 3:
    embed(colour word) + embed(shape word) for a patch an object paints, a learned `nothing` vector for the
    background, plus a learned vector for the patch's column and one for its row. Used only in training; not
    part of the exported model."""

    def __init__(self, dim: int, tok: _Tok):
        super().__init__()
        self.register_buffer("color_words", torch.tensor([tok.ids(c)[0] for c in ALL_COLORS]), persistent=False)
        self.register_buffer("shape_words", torch.tensor([tok.ids(s)[0] for s in SHAPE_IDS]), persistent=False)
        self.nothing = torch.nn.Parameter(torch.randn(dim))
        self.column = torch.nn.Parameter(torch.randn(GRID, dim) * 0.5)
        self.row = torch.nn.Parameter(torch.randn(GRID, dim) * 0.5)

    @property
    def place(self) -> torch.Tensor:
        """(GRID*GRID, dim) the place vector of each patch, row-major."""
        return (self.row[:, None, :] + self.column[None, :, :]).flatten(0, 1)

    def forward(self, labels: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """(B, GRID*GRID, dim) tokens for per-patch (colour id, shape id) labels, `embed` the word embeddings."""
        color, shape = labels[..., 0], labels[..., 1]
        obj = embed[self.color_words[(color - 1).clamp(min=0)]] + embed[self.shape_words[(shape - 1).clamp(min=0)]]
        return torch.where((color > 0)[..., None], obj, self.nothing) + self.place


def answer_loss(model, hidden, lab, early, fams, blk):
    """Summed cross-entropy over labelled positions, their count, per-family (correct, total) answers under
    teacher forcing (an answer counts as correct when all its tokens and the </s> are), and the mean
    early-answer loss."""
    sel_early = early != IGNORE
    early_loss = F.cross_entropy(model.lm_head(hidden[sel_early]).float(), early[sel_early])
    sel = lab != IGNORE
    logits = model.lm_head(hidden[sel])
    target = lab[sel]
    loss = F.cross_entropy(logits.float(), target, reduction="sum")
    hit = (logits.argmax(-1) == target).tolist()
    flat_fams = [f for row, m in zip(fams, sel.tolist()) for f, keep in zip(row, m) if keep]
    answers: dict[tuple[int, int], list] = {}
    for h, f, b, r in zip(hit, flat_fams, blk[sel].tolist(), sel.nonzero()[:, 0].tolist()):
        answers.setdefault((r, b), [f, True])[1] &= bool(h)
    stats: dict[str, list[int]] = {}
    for f, ok in answers.values():
        s = stats.setdefault(f, [0, 0])
        s[0] += int(ok)
        s[1] += 1
    return loss, int(sel.sum()), stats, early_loss


def decoder_hidden(model, ids, pos, blk, visual: torch.Tensor | None):
    """Last hidden states of the decoder over packed rows, with `visual` (B, 144, dim) at the image positions
    (rows without an image pass None)."""
    embeds = model.get_input_embeddings()(ids)
    if visual is not None:
        embeds = embeds.masked_scatter((ids == IMAGE_ID)[..., None], visual.to(embeds.dtype))
    return model.model.language_model(inputs_embeds=embeds, attention_mask=block_mask(blk), position_ids=pos,
                                      use_cache=False).last_hidden_state


def projected_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 144, dim) projector outputs for `pixels`: the visual tokens the model feeds its decoder."""
    feats = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default").pooler_output
    return torch.stack(list(feats))


def patch_loss(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch relative to the targets' mean square (so 1.0 means predicting zeros)."""
    return F.mse_loss(tokens, target) / target.pow(2).mean().clamp(min=1e-8)


def early_weight(cfg: TrainConfig, step: int) -> float:
    """Weight of the early-answer loss: `cfg.early` when phase 1 starts, falling linearly to 0 at
    `cfg.early_until` of it; 0 afterwards."""
    name, d, n = cfg.phase(step)
    end = cfg.early_until * n
    return cfg.early * max(0.0, 1.0 - d / end) if name == "symbolic" and end > 0 else 0.0


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio`, within each phase (`joint_lr` in phase 3)."""
    name, d, n = cfg.phase(step)
    peak = cfg.joint_lr if name == "joint" else cfg.lr
    if d < cfg.warmup:
        return peak * (d + 1) / cfg.warmup
    t = (d - cfg.warmup) / max(1, n - cfg.warmup)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _trainable(model, symbolic: SymbolicTokens, phase: str) -> list[torch.nn.Parameter]:
    tower = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    if phase == "tower":
        return tower
    decoder = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    return decoder + (list(symbolic.parameters()) if phase == "symbolic" else tower)


def _optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig):
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def train_step(model, symbolic: SymbolicTokens, cfg: TrainConfig, step: int, batch: dict, window: "_Window"):
    """Forward and backward of one step (the caller steps the optimizer)."""
    phase = cfg.phase(step)[0]
    embed = model.get_input_embeddings().weight
    *_, pixels, labels = batch["image"]
    target = symbolic(labels, embed)
    if phase == "tower":
        loss = patch_loss(projected_tokens(model, pixels), target.detach())
        loss.backward()
        window.add(patch=float(loss.detach()))
        return
    tokens = target if phase == "symbolic" else projected_tokens(model, pixels)
    losses, early_losses, count = [], [], 0
    for name, (ids, pos, blk, lab, early, fams, _, _) in batch.items():
        hidden = decoder_hidden(model, ids, pos, blk, tokens if name == "image" else None)
        loss, n, stats, early_loss = answer_loss(model, hidden, lab, early, fams, blk)
        losses.append(loss)
        early_losses.append(early_loss)
        count += n
        window.add_stats(stats)
    total = torch.stack(losses).sum() / count
    early_total = torch.stack(early_losses).mean()
    objective = total + early_weight(cfg, step) * early_total
    if phase == "joint":
        patch = patch_loss(tokens, target.detach())
        objective = objective + cfg.patch_weight * patch
        window.add(patch=float(patch.detach()))
    objective.backward()
    window.add(loss=float(total.detach()) * count, tokens=count, early=float(early_total.detach()))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_at: int | None = None) -> Path | None:
    """Train (or resume) a testbed model; returns the exported Hugging Face folder (cfg.out/model). With
    `stop_at`, stop once that step is done and saved (the run continues later with `resume=True`); returns
    None then."""
    from tqdm.auto import tqdm

    from visroute.testbed.evaluate import HELDOUT_SEED, Evaluator

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path, log_path = out / "train_state.pt", out / "log.jsonl"
    model = build_model(cfg.size, cfg.seed)
    init_weights(model)
    tok = _Tok()
    symbolic = SymbolicTokens(model.config.text_config.hidden_size, tok)
    start, elapsed, opt_state = 0, 0.0, None
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if _recipe(state["config"]) != _recipe(asdict(cfg)):
            raise ValueError(f"{state_path} was written with other training settings: {state['config']}")
        model.load_state_dict(state["model"])
        symbolic.load_state_dict(state["symbolic"])
        start, elapsed = state["step"], state["elapsed"]
        if start < cfg.steps and state["phase"] == cfg.phase(start)[0]:
            opt_state = state["optimizer"]
        _truncate_log(log_path, start)
    elif log_path.exists():
        log_path.unlink()
    processor = build_processor()
    held_out = make_items(cfg.eval_items, seed=HELDOUT_SEED + 1)  # a small set apart from the reported one
    model.train()
    window = _Window()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not progress, dynamic_ncols=True)
    t_last = time.perf_counter()
    opt, opt_phase = None, None
    for step in range(start, cfg.steps):
        phase, d, n = cfg.phase(step)
        if phase != opt_phase:  # every phase trains its own parameters with a fresh optimizer
            params = _trainable(model, symbolic, phase)
            for p in list(model.parameters()) + list(symbolic.parameters()):
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt, opt_phase = _optimizer(params, cfg), phase
            if opt_state is not None:
                opt.load_state_dict(opt_state)
                opt_state = None
            bar.set_description(f"train ({phase})")
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        train_step(model, symbolic, cfg, step, make_batch(cfg, step, tok), window)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            line = {"step": done, "phase": phase, "lr": lr_at(cfg, step), "elapsed_s": round(elapsed, 1),
                    **window.summary()}
            if "loss" in line or "patch_loss" in line:
                bar.set_postfix(loss=f"{line.get('loss', line.get('patch_loss')):.3f}")
            _log(log_path, line)
            window = _Window()
        tower_done = done == cfg.symbolic_steps + cfg.tower_steps
        if cfg.eval_every and (tower_done or (phase == "joint" and (d + 1) % cfg.eval_every == 0)
                               or done == cfg.steps):
            model.eval()
            rep = Evaluator(model, processor, held_out, progress=False).run(None)
            model.train()
            _log(log_path, {"step": done, "eval": rep.accuracy(), "elapsed_s": round(elapsed, 1)})
            t_last = time.perf_counter()
        if done % cfg.save_every == 0 or done == cfg.steps or done == stop_at:
            torch.save({"model": model.state_dict(), "symbolic": symbolic.state_dict(),
                        "optimizer": opt.state_dict(), "phase": phase, "step": done, "elapsed": elapsed, "config": asdict(cfg)},
                       state_path)
            t_last = time.perf_counter()
        if done == stop_at:
            bar.close()
            return None
    bar.close()
    model.eval()
    folder = export(model, out / "model")
    plot_curve(log_path, out / "curve.png")
    return folder


class _Window:
    """Running sums between two log lines."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        self.stats: dict[str, list[int]] = {}

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.steps[k] = self.steps.get(k, 0) + 1

    def add_stats(self, stats: dict[str, list[int]]) -> None:
        for f, (c, t) in stats.items():
            s = self.stats.setdefault(f, [0, 0])
            s[0] += c
            s[1] += t

    def summary(self) -> dict:
        out = {}
        if self.sums.get("tokens"):
            out["loss"] = self.sums["loss"] / self.sums["tokens"]
        for k in ("patch", "early"):
            if k in self.sums:
                out[f"{k}_loss"] = self.sums[k] / self.steps[k]
        if self.stats:
            out["train_acc"] = {f: c / t for f, (c, t) in sorted(self.stats.items()) if t}
        return out


def export(model, folder: str | Path) -> Path:
    """Save `model` with the testbed tokenizer and processor as a Hugging Face folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_processor().save_pretrained(folder)
    return folder


def _recipe(cfg: dict) -> dict:
    """The settings that decide the trained weights (not where or how often things are written)."""
    skip = {"out", "threads", "log_every", "eval_every", "eval_items", "save_every"}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k not in skip}


def _log(path: Path, line: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of a log.jsonl."""
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return [x for x in lines if "eval" not in x], [x for x in lines if "eval" in x]


def plot_curve(log_path: str | Path, png: str | Path) -> None:
    """Answer loss and per-patch loss (left) and held-out accuracy per family (right) against steps, with the
    phase boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_lines, eval_lines = read_log(log_path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "answer loss"), ("patch_loss", "per-patch loss")):
        pts = [(x["step"], x[key]) for x in train_lines if key in x]
        if pts:
            ax1.plot(*zip(*pts), lw=1, label=label)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("training losses")
    ax1.legend(fontsize=8)
    for fam in FAMILIES:
        pts = [(x["step"], x["eval"][fam]) for x in eval_lines if fam in x["eval"]]
        if pts:
            ax2.plot(*zip(*pts), marker="o", ms=3, label=fam)
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out accuracy (greedy)")
    ax2.set_ylim(0, 1.02)
    if eval_lines:
        ax2.legend(fontsize=8)
    ax2.set_title("held-out accuracy per family (real image path)")
    previous = None
    for x in train_lines:
        if previous is not None and x.get("phase") != previous:
            for ax in (ax1, ax2):
                ax.axvline(x["step"], color="grey", lw=0.8, ls="--")
            ax1.text(x["step"], ax1.get_ylim()[1], f" {x.get('phase')}", va="top", fontsize=7, color="grey")
        previous = x.get("phase")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
