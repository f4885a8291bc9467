"""What `visroute bench` measures and how (`BenchSettings`, whose fields are also the command's flags). Free of
torch, so that `visroute bench --help` does not import it."""

from __future__ import annotations

from dataclasses import dataclass, field

from visroute.names import DTYPE_NAMES


def parse_image_size(spec: str) -> tuple[int, int]:
    """"672x480" -> (672, 480) as (height, width); "672" -> a square."""
    try:
        h, _, w = spec.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise ValueError(f"Bad image size {spec!r}: expected HxW, e.g. 672x672") from None


@dataclass
class BenchSettings:
    """What `visroute bench` measures and how; each field is also a command-line flag."""

    shape: str = field(metadata={"help": "model shape (visroute.families.shapes())"})
    dtype: str = field(default="bfloat16", metadata={"help": "weights and activations", "choices": DTYPE_NAMES})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    repeats: int = field(default=3, metadata={"help": "timed prefills per config"})
    warmup: int = field(default=1, metadata={"help": "untimed prefills per config before timing"})
    prefill_batch: int = field(default=8, metadata={"help": "prompts per timed prefill (copies of the prompt)"})
    new_tokens: int = field(default=16, metadata={"help": "greedy decode steps per run and batch (the first untimed)"})
    decode_repeats: int = field(default=2, metadata={"help": "decode runs per config and batch (0: no decode timing)"})
    decode_batches: str = field(default="1,8,32", metadata={"help": "batch sizes to time decode at, comma-separated"})
    text_tokens: int = field(default=64, metadata={"help": "text tokens in the prompt besides the image"})
    image_size: str = field(default="672x672", metadata={"help": "HxW of the image (Qwen shapes; LLaVA's is fixed)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's choice)"})
    seed: int = field(default=0, metadata={"help": "random weights and inputs"})
    keep_all: bool = field(default=True, metadata={"help": "measure the routed keep-all row (engine overhead)"})
    static_baseline: bool = field(default=True, metadata={
        "help": "also time the unrouted model's decode on transformers' StaticCache (a decode-only row)"})
    memory: bool = field(default=True, metadata={"help": "measure peak memory"})

    def __post_init__(self) -> None:
        # the shapes come from the model families, which import torch: read when settings are made, not when the
        # command line lists these fields as flags
        from visroute.families import get_shape

        get_shape(self.shape)  # a clear error for an unknown shape before anything is built
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
        if self.repeats < 1 or self.prefill_batch < 1:
            raise ValueError("repeats and prefill_batch must be at least 1")
        self.batches  # a clear error for a bad list
        for name in ("warmup", "new_tokens", "decode_repeats", "text_tokens", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        parse_image_size(self.image_size)

    @property
    def batches(self) -> tuple[int, ...]:
        """The decode batch sizes."""
        try:
            out = tuple(int(b) for b in str(self.decode_batches).split(",") if b.strip())
        except ValueError:
            out = ()
        if not out or min(out) < 1:
            raise ValueError(f"Bad decode_batches {self.decode_batches!r}: expected batch sizes, e.g. 1,8,32")
        return out

    @property
    def image_hw(self) -> tuple[int, int]:
        return parse_image_size(self.image_size)
