"""GranViT processor: images + chat-formatted text -> ``input_ids``, ``attention_mask``, ``pixel_values`` [, ``labels``].

Box convention (the one of the whole project): outside this file a box is ``[x1, y1, x2, y2]`` in pixels of the
original (EXIF-upright) image. The processor's codec (``processor.codec``, box_codec_granvit.py) turns it into the
model's box format (``box_format``, fixed at build time and stored in the checkpoint): ``"text"``, the paper's
``[x1, y1, x2, y2]`` in ``num_coord_bins`` bins written with the LLM's own digits, which a frozen stage-1 LLM already
reads; or ``"tokens"``, ``<box><coord_x1><coord_y1><coord_x2><coord_y2></box>``, 6 new vocabulary entries the LLM must
learn. Decoding returns bin centres in original pixels (a round trip is exact to within half a bin). Coordinate tokens
are ordinary *added* tokens, not special ones: ``skip_special_tokens=True`` (the image-text-to-text pipeline's) would
otherwise erase every predicted box.

The chat format, the prompt builders, untrusted user text and the reading of task requests are prompts_granvit.py's
(``GranViTPromptsMixin``, a base of the processor). This file tokenizes a prompt (``<image>`` expanded, untrusted text
as plain text) and leaves padding to the tokenizer (``tokenizer.pad``), as transformers' LLaVA processor leaves it to
its tokenizer call.
"""

import itertools
import re
from typing import TypedDict, Unpack

import torch
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs

from .box_codec_granvit import BOX_END, BOX_FORMATS, BOX_START, BoxCodec, coord_token
from .box_utils_granvit import check_box
# The chat constants are also read from here (train/parts, the tests): prompts_granvit.py defines them.
from .prompts_granvit import ASSISTANT_TOKEN, BBOX2CAPTION_TEMPLATE, CAPTION2BBOX_TEMPLATE, CHAT_TEMPLATE  # noqa: F401
from .prompts_granvit import IMAGE_TOKEN, NOT_FOUND_ANSWER, REQUEST_END, REQUEST_START, UNTRUSTED_END  # noqa: F401
from .prompts_granvit import UNTRUSTED_START, USER_TOKEN, VQA_TEMPLATE, GranViTPromptsMixin, strip_markers
from .tiling_granvit import view_markers

# The tokenizer kwargs GranViT honours (processor(..., padding=..., ...) as in other HF processors). GranViT tokenizes
# its prompts itself, so the rest of TextKwargs (stride, offsets, pre-split words, ...) would silently do nothing.
TEXT_KWARGS = {"padding", "truncation", "max_length", "pad_to_multiple_of", "padding_side", "return_attention_mask",
               "return_tensors", "add_special_tokens"}
GranViTTextKwargs = TypedDict(
    "GranViTTextKwargs", {k: v for k, v in TextKwargs.__annotations__.items() if k in TEXT_KWARGS}, total=False
)


class GranViTProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: GranViTTextKwargs


def box_format_tokens(box_format: str, num_coord_bins: int) -> list[str]:
    """The tokens a tokenizer needs for GranViT in a box format (chat scaffolding [+ box and coordinate tokens])."""
    return [IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN] + BoxCodec(num_coord_bins, box_format).added_tokens()


class GranViTProcessor(GranViTPromptsMixin, ProcessorMixin):
    valid_processor_kwargs = GranViTProcessorKwargs
    # Defaults of the call (the lowest priority in `_merge_kwargs`): a padded batch of tensors, as GranViT always gave.
    text_kwargs = {"padding": "longest", "return_tensors": "pt"}

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_image_tokens: int = 1024,
        num_coord_bins: int = 1000,
        bbox2caption_template: str = BBOX2CAPTION_TEMPLATE,
        caption2bbox_template: str = CAPTION2BBOX_TEMPLATE,
        vqa_template: str = VQA_TEMPLATE,
        box_format: str = "tokens",
        not_found_answer: str = NOT_FOUND_ANSWER,
        **kwargs,
    ):
        if box_format not in BOX_FORMATS:
            raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
        self.box_format = box_format
        self.image_token = IMAGE_TOKEN
        self.num_image_tokens = int(num_image_tokens)
        self.num_coord_bins = int(num_coord_bins)
        self.bbox2caption_template = bbox2caption_template
        self.caption2bbox_template = caption2bbox_template
        self.vqa_template = vqa_template
        self.not_found_answer = not_found_answer
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)
        missing = [t for t in self.control_tokens() if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"Tokenizer lacks {len(missing)} GranViT tokens (e.g. {missing[:3]}); "
                "call GranViTProcessor.add_tokens(tokenizer, num_coord_bins, box_format) first"
            )
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.box_start_token_id = self.box_end_token_id = self.coord_token_start_id = None
        if box_format == "tokens":
            self.box_start_token_id = tokenizer.convert_tokens_to_ids(BOX_START)
            self.box_end_token_id = tokenizer.convert_tokens_to_ids(BOX_END)
            self.coord_token_start_id = tokenizer.convert_tokens_to_ids(coord_token(0))
            if tokenizer.convert_tokens_to_ids(coord_token(self.num_coord_bins - 1)) != (
                self.coord_token_start_id + self.num_coord_bins - 1
            ):
                raise ValueError("Coordinate tokens must have contiguous ids <coord_0> .. <coord_{n-1}>")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer needs an eos token (it ends every turn and pads batches)")

    # ---- tokenizer set-up ---------------------------------------------------------------------------------------
    def control_tokens(self) -> list[str]:
        return box_format_tokens(self.box_format, self.num_coord_bins)

    @staticmethod
    def add_tokens(tokenizer, num_coord_bins: int = 1000, box_format: str = "tokens") -> dict:
        """Add GranViT's tokens to any tokenizer (those it already has are kept); returns the ids the config needs.

        ``<image>`` and the role tokens are special (chat scaffolding, dropped by ``skip_special_tokens``); with
        ``box_format="tokens"``, ``<box>``, ``</box>`` and ``<coord_i>`` are ordinary added tokens so decoded answers
        keep their boxes. The text format adds no box tokens: the tokenizer's own digits write the numbers.
        """
        codec = BoxCodec(num_coord_bins, box_format)  # checks box_format
        vocab = tokenizer.get_vocab()
        special = [t for t in (IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN) if t not in vocab]
        if special:
            tokenizer.add_special_tokens({"extra_special_tokens": special}, replace_extra_special_tokens=False)
        ids = {"image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
        if box_format == "tokens":
            tokenizer.add_tokens(codec.added_tokens())
            ids.update(
                box_start_token_id=tokenizer.convert_tokens_to_ids(BOX_START),
                box_end_token_id=tokenizer.convert_tokens_to_ids(BOX_END),
                coord_token_start_id=tokenizer.convert_tokens_to_ids(coord_token(0)),
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return ids

    # ---- boxes -------------------------------------------------------------------------------------------------------
    @property
    def codec(self) -> BoxCodec:
        """The box codec of this checkpoint (bins and box format): box_codec_granvit.py."""
        return BoxCodec(self.num_coord_bins, self.box_format)

    @staticmethod
    def validate_box(box, image_size: tuple[int, int]) -> list[float]:
        """Check a pixel box against its image; returns it as floats or raises ValueError naming the box and rule."""
        return check_box(box, image_size)

    def box_to_bins(self, box, image_size: tuple[int, int]) -> list[int]:
        return self.codec.quantize(box, image_size)

    def format_bins(self, bins: list[int]) -> str:
        """Four bins in the box format: ``[a, b, c, d]`` (text) or ``<box><coord_a>..<coord_d></box>`` (tokens)."""
        return self.codec.format_bins(bins)

    def encode_box(self, box, image_size: tuple[int, int]) -> str:
        """``[x1, y1, x2, y2]`` original pixels -> the box in the model's box format."""
        return self.codec.encode(box, image_size)

    def encode_boxes(self, boxes, image_size: tuple[int, int]) -> str:
        """Several boxes as one answer (Caption2Bbox with more than one matching region)."""
        return self.codec.encode_many(boxes, image_size)

    @property
    def max_box_tokens(self) -> int:
        """Tokens one box takes at most in an answer (the widest bins), for ``max_new_tokens`` budgets."""
        widest = self.format_bins([self.num_coord_bins - 1] * 4)
        return len(self.tokenizer(widest, add_special_tokens=False)["input_ids"])

    @property
    def box_pattern(self) -> re.Pattern:
        """A regex matching one box of this box format in decoded text; its 4 groups are the bins."""
        return self.codec.pattern

    def decode_boxes(self, text: str, image_size: tuple[int, int]) -> list[list[float]]:
        """Every well-formed box in ``text`` as original pixels (bin centres). Malformed output gives ``[]``."""
        return self.codec.decode(text, image_size)

    def post_process_grounding(self, generated, image_sizes) -> list[list[list[float]]]:
        """Generated ids (tensor or lists) or decoded strings -> per sample, the list of boxes in original pixels."""
        if isinstance(generated, torch.Tensor) or (len(generated) and not isinstance(generated[0], str)):
            generated = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [self.decode_boxes(text, size) for text, size in zip(generated, image_sizes)]

    # ---- tokenization -------------------------------------------------------------------------------------------
    @property
    def tiling(self) -> bool:
        """Whether images are tiled (the image processor's ``max_tiles``, recorded at build time)."""
        return bool(getattr(self.image_processor, "max_tiles", 0))

    def image_token_ids(self, grid=None) -> list[int]:
        """What one ``<image>`` becomes: ``num_image_tokens`` image tokens, or with tiling (``grid`` = (rows, cols)),
        per view its marker text (``global:``, ``tile 1,2:``, ...) then that view's image tokens."""
        image_ids = [self.image_token_id] * self.num_image_tokens
        if grid is None:
            return image_ids
        ids = []
        for marker in view_markers(grid):
            ids += self.tokenizer(marker, add_special_tokens=False)["input_ids"] + image_ids
        return ids

    def _encode(self, text: str, image_grids=None) -> list[int]:
        """Trusted segments as-is (``<image>`` expanded; with tiling, the i-th by ``image_grids[i]``), untrusted
        segments as plain text."""
        grids = iter([None] * text.count(IMAGE_TOKEN) if image_grids is None else [tuple(g) for g in image_grids])
        ids = []
        for i, segment in enumerate(re.split(f"{UNTRUSTED_START}(.*?){UNTRUSTED_END}", text, flags=re.DOTALL)):
            segment = strip_markers(segment)
            if not segment:
                continue
            if i % 2:
                ids += self._plain_ids(segment)
                continue
            for token_id in self.tokenizer(segment, add_special_tokens=False)["input_ids"]:
                ids += self.image_token_ids(next(grids)) if token_id == self.image_token_id else [token_id]
        return ids

    def __call__(
        self,
        images=None,
        text=None,
        targets=None,
        videos=None,
        audio=None,
        **kwargs: Unpack[GranViTProcessorKwargs],
    ) -> BatchFeature:
        """Images + user prompts (or chat-formatted text) [+ answers] -> ``input_ids``, ``attention_mask``,
        ``pixel_values`` [, ``labels``].

        ``text`` not starting with ``<|user|>`` is a user message and gets the chat format, with one ``<image>`` per
        image of its sample. With ``targets`` each answer (+ eos) is appended and ``labels`` are -100 everywhere
        else; batches are then right-padded (training), otherwise left-padded (generation), unless ``padding_side``
        says otherwise. The tokenizer kwargs work as in other processors (``padding``, ``truncation``,
        ``max_length``, ``pad_to_multiple_of``, ``padding_side``, ``return_attention_mask``, ``return_tensors``; flat
        or in ``text_kwargs``); GranViT pads to the longest prompt and returns tensors by default. Any other kwarg
        raises: GranViT tokenizes its prompts itself (chat format, untrusted user text, ``<image>`` expansion).
        """
        if text is None:
            raise ValueError("GranViTProcessor needs text (a prompt per sample)")
        if videos is not None or audio is not None:
            raise ValueError("GranViTProcessor takes images and text; videos and audio are not supported")
        self._check_kwargs(kwargs)
        # No tokenizer init kwargs: a tokenizer's saved padding_side must not override the training/generation default.
        options = self._merge_kwargs(**kwargs)["text_kwargs"]
        if options.get("add_special_tokens"):
            raise ValueError("add_special_tokens=True: GranViT prompts carry their own chat tokens; the tokenizer adds none")
        texts = [text] if isinstance(text, str) else list(text)
        per_sample_images = self._group_images(images, len(texts))
        chats = [self._chat(t, len(imgs)) for t, imgs in zip(texts, per_sample_images)]
        for chat, imgs in zip(chats, per_sample_images):
            n_placeholders = chat.count(IMAGE_TOKEN) - sum(
                seg.count(IMAGE_TOKEN) for seg in re.findall(f"{UNTRUSTED_START}(.*?){UNTRUSTED_END}", chat, flags=re.DOTALL)
            )
            if n_placeholders != len(imgs):
                raise ValueError(f"Prompt has {n_placeholders} <image> placeholder(s) but {len(imgs)} image(s): {chat!r}")

        flat_images = [img for imgs in per_sample_images for img in imgs]
        image_features = self.image_processor(flat_images) if flat_images else {}
        grids = image_features["image_grids"].tolist() if "image_grids" in image_features else None
        starts = list(itertools.accumulate((len(imgs) for imgs in per_sample_images), initial=0))
        per_sample_grids = [None if grids is None else grids[a:b] for a, b in itertools.pairwise(starts)]
        sequences = [self._encode(chat, g) for chat, g in zip(chats, per_sample_grids)]
        labels = None
        if targets is not None:
            targets = [targets] if isinstance(targets, str) else list(targets)
            if len(targets) != len(sequences):
                raise ValueError(f"{len(targets)} targets for {len(sequences)} prompts")
            eos = self.tokenizer.eos_token_id
            # Targets are trusted (box tokens must stay tokens): mark caption targets with `plain_text`.
            answers = [self._encode(t) + [eos] for t in targets]
            labels = [[-100] * len(s) + a for s, a in zip(sequences, answers)]
            sequences = [s + a for s, a in zip(sequences, answers)]
        if options.get("truncation") not in (None, False, "do_not_truncate"):
            sequences, labels = self._truncate(sequences, labels, options.get("max_length"), per_sample_grids,
                                               [len(imgs) for imgs in per_sample_images])
        data = self._pad(sequences, labels, options, side="right" if targets is not None else "left")
        if flat_images:
            data["pixel_values"] = image_features["pixel_values"]  # (views, 3, S, S): one view per image untiled
            if grids is not None:
                data["image_grids"] = image_features["image_grids"]  # (images, 2): rows, cols of each image's tiles
        return BatchFeature(data=data, tensor_type=options.get("return_tensors"))

    @classmethod
    def _check_kwargs(cls, kwargs: dict) -> None:
        """Raise on any kwarg GranViT does not honour, flat or inside ``text_kwargs`` / ``images_kwargs`` / ..."""
        allowed = {"text_kwargs": TEXT_KWARGS, "images_kwargs": {"return_tensors"}, "common_kwargs": {"return_tensors"},
                   "videos_kwargs": set(), "audio_kwargs": set()}
        unknown = [key for key in kwargs if key not in TEXT_KWARGS and key not in allowed]
        for group, keys in allowed.items():
            unknown += [f"{group}[{key!r}]" for key in (kwargs.get(group) or {}) if key not in keys]
        if unknown:
            raise TypeError(
                f"GranViTProcessor got unexpected keyword argument(s) {', '.join(map(str, unknown))}; it takes images, "
                f"text, targets and {', '.join(sorted(TEXT_KWARGS))}"
            )

    def _group_images(self, images, batch_size: int) -> list[list]:
        if images is None:
            return [[] for _ in range(batch_size)]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if all(isinstance(x, (list, tuple)) for x in images):
            grouped = [list(x) for x in images]
        elif len(images) == batch_size:
            grouped = [[x] for x in images]
        elif batch_size == 1:
            grouped = [list(images)]
        else:
            raise ValueError(f"{len(images)} images for {batch_size} prompts: pass one image per prompt or nested lists")
        if len(grouped) != batch_size:
            raise ValueError(f"{len(grouped)} image groups for {batch_size} prompts")
        return grouped

    def _truncate(self, sequences, labels, max_length, per_sample_grids, num_images):
        """Cut each sequence (and its labels) to ``max_length`` on the tokenizer's ``truncation_side``; a cut into
        the image tokens is an error (the model needs all of them)."""
        max_length = max_length or self.tokenizer.model_max_length
        cut = (lambda x: x[-max_length:]) if self.tokenizer.truncation_side == "left" else (lambda x: x[:max_length])
        sequences = [cut(s) for s in sequences]
        for seq, grids, n in zip(sequences, per_sample_grids, num_images):
            expected = sum(self.image_token_ids(g).count(self.image_token_id) for g in (grids or [None] * n))
            if seq.count(self.image_token_id) != expected:
                raise ValueError(f"max_length={max_length} cuts into the image tokens ({n} image(s), {expected} image "
                                 "tokens); raise max_length")
        return sequences, None if labels is None else [cut(lab) for lab in labels]

    def _pad(self, sequences: list[list[int]], labels: list[list[int]] | None, options: dict, side: str) -> dict:
        """The tokenizer pads (``padding``, ``max_length``, ``pad_to_multiple_of``, ``padding_side`` as in its own
        call; left for generation, right with targets by default); labels are padded alike with -100. Lists come
        back (the BatchFeature makes the tensors), ragged with ``padding=False``."""
        ragged = len({len(s) for s in sequences}) > 1
        if options.get("padding") in (False, None, "do_not_pad") and ragged and options.get("return_tensors"):
            raise ValueError("prompts of different lengths cannot become tensors without padding: pass padding=True "
                             "or return_tensors=None")
        if options.get("padding") == "max_length" and max(map(len, sequences)) > (options.get("max_length") or 0) > 0:
            raise ValueError(f"a prompt has {max(map(len, sequences))} tokens, more than max_length="
                             f"{options['max_length']}; pass truncation=True")
        padded = self.tokenizer.pad(
            {"input_ids": sequences}, padding=options.get("padding") or False, max_length=options.get("max_length"),
            pad_to_multiple_of=options.get("pad_to_multiple_of"), padding_side=options.get("padding_side") or side,
            return_attention_mask=options.get("return_attention_mask"),
        )
        data = dict(padded)
        if labels is not None:
            left = (options.get("padding_side") or side) == "left"
            data["labels"] = [[-100] * (len(row) - len(lab)) * left + lab + [-100] * (len(row) - len(lab)) * (not left)
                              for row, lab in zip(data["input_ids"], labels)]
        return data

    # ---- dense region decoding ------------------------------------------------------------------------------------
    def prompt_ids(self, prompts: list[str], num_images: int = 1, image_grids=None) -> list[list[int]]:
        """Unpadded token ids of each prompt exactly as ``__call__`` builds them (chat format, ``<image>`` expanded;
        with tiling, by the images' ``image_grids`` from the image processor), without touching any image: for
        callers that share one encoded image across prompts (``model.describe_regions`` / ``model.ground``, see
        region_decoding_granvit.py)."""
        if self.tiling and image_grids is None:
            raise ValueError("prompt_ids: this processor tiles images (max_tiles="
                             f"{self.image_processor.max_tiles}); pass the image_grids its image processor returned")
        grids = None if image_grids is None else [tuple(g) for g in torch.as_tensor(image_grids).tolist()]
        return [self._encode(self._chat(p, num_images), grids) for p in prompts]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"] + (["image_grids"] if self.tiling else [])

    @classmethod
    def from_parts(
        cls, image_processor, tokenizer_or_path, num_image_tokens: int, num_coord_bins: int, box_format: str = "tokens",
        **kwargs,
    ):
        """Build from an image processor and a tokenizer (object or path), adding GranViT's tokens if missing."""
        tokenizer = tokenizer_or_path
        if isinstance(tokenizer_or_path, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_or_path)
        cls.add_tokens(tokenizer, num_coord_bins, box_format)
        return cls(
            image_processor, tokenizer, num_image_tokens=num_image_tokens, num_coord_bins=num_coord_bins,
            box_format=box_format, **kwargs,
        )


__all__ = ["GranViTProcessor"]
