"""DataConfig: every knob of the data pipeline, overridable from the command line as ``data.<field>``.

The model decides what a media token is (``ModelConfig.image_token_id``, ``tokens_per_image``,
the encoder's kind and image size); this config decides everything between files and the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_MODES = ("square", "pad", "keep")
SPLICE = (None, "first", "middle", "last")
PACKING_ALGOS = ("first_fit_decreasing", "first_fit_shuffle")
ON_BAD = ("error", "skip")


@dataclass(frozen=True)
class DataConfig:
    """The data pipeline: LLaVA files, template, tokenizer, media, packing, batches."""

    data_path: str = "data/synthetic/train.jsonl"   # training files, comma-separated: LLaVA JSON (a list) or JSONL
    eval_path: str | None = "data/synthetic/eval.jsonl"  # held-out records (same format)
    image_folder: str | None = None       # image paths are relative to this (default: the data file's folder)
    video_folder: str | None = None       # a folder or a .tar of videos (default: the data file's folder)
    tokenizer: str = "mixtral"            # mixtral | llama3 (shipped, offline) | a local HF tokenizer folder
    template: str = "mistral"   # plain | v1 | llama_2 | llama_3 | mistral | mistral_vila (NeMo's) | nvgpt | chatml
    system_prompt: str | None = None      # replaces the template's default system prompt
    image_mode: str = "square"            # square (the encoder's HF processor) | pad (LLaVA-1.5) | keep
    num_frames: int = 4                   # frames per <video> (NeMo: linspace; repeat the last; -1 = all frames)
    splice_single_frame: str | None = None  # first | middle | last: one frame per video instead (NeMo)
    fps: float | None = None              # sample at this rate instead of num_frames (LLaVA-Video's video_fps=1)
    max_frames: int = 32                  # with fps: a longer video gets this many, uniformly (frames_upbound)
    frame_timestamps: bool = False        # "<video> sampled at 0.0s, 1.0s, ..." (LLaVA-Video's time instruction)
    frame_folder_fps: float = 1.0         # the rate a video given as frame images was extracted at
    max_seq_len: int = 256                # longer samples are truncated (counted, never inside a media span)
    packing: bool = False                 # pack samples into rows of max_seq_len
    packing_algorithm: str = "first_fit_decreasing"  # first_fit_decreasing | first_fit_shuffle
    pad_to_max_seq_len: bool = False      # unpacked rows: pad every batch to max_seq_len (fixed shapes)
    batch_size: int = 8                   # rows per step on each data-parallel rank
    shuffle: bool = True                  # a new sample order every epoch (false: file order)
    seed: int = 0                         # the sample order (resumable: a checkpoint holds the position)
    num_workers: int = 2                  # DataLoader worker processes (decode images and video)
    on_bad_sample: str = "error"          # error: stop naming the sample | skip: count, log and go on
    max_skip_fraction: float = 0.01       # skip: more skipped samples than this fraction of the data (>= 1) is an error

    def validate(self) -> "DataConfig":
        """Raise on a value that cannot work, naming the ``data.`` field and what would."""
        from neva.data.templates import TEMPLATES  # late: templates import nothing from here

        if self.template not in TEMPLATES:
            raise ValueError(f"data.template={self.template!r} is not a known template: use one of {sorted(TEMPLATES)}")
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"data.image_mode={self.image_mode!r}: use one of {IMAGE_MODES}")
        if self.splice_single_frame not in SPLICE:
            raise ValueError(f"data.splice_single_frame={self.splice_single_frame!r}: use first, middle, last or null")
        if self.num_frames == 0 or self.num_frames < -1:
            raise ValueError(f"data.num_frames={self.num_frames}: use a positive count or -1 (all frames)")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"data.fps={self.fps}: use a positive rate (frames per second) or null for num_frames")
        if self.max_frames < 1:
            raise ValueError(f"data.max_frames={self.max_frames} must be at least 1")
        if self.frame_folder_fps <= 0:
            raise ValueError(f"data.frame_folder_fps={self.frame_folder_fps} must be positive")
        if self.packing_algorithm not in PACKING_ALGOS:
            raise ValueError(f"data.packing_algorithm={self.packing_algorithm!r}: use one of {PACKING_ALGOS}")
        if self.on_bad_sample not in ON_BAD:
            raise ValueError(f"data.on_bad_sample={self.on_bad_sample!r}: use error or skip")
        if self.max_seq_len < 2:
            raise ValueError(f"data.max_seq_len={self.max_seq_len} must be at least 2")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size} must be at least 1")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"data.max_skip_fraction={self.max_skip_fraction} must lie in [0, 1]")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")
        return self

    @property
    def frames_per_video(self) -> int:
        """Media images one <video> becomes (-1: it depends on the video: all its frames, or fps)."""
        fixed = self.frame_choice().fixed
        return -1 if fixed is None else fixed

    def frame_choice(self):
        """How ``neva.data.video`` picks each video's frames."""
        from neva.data.video import FrameChoice  # late: video imports nothing from here

        return FrameChoice(self.num_frames, self.splice_single_frame, self.fps, self.max_frames, self.frame_folder_fps)
