"""GranViT processor: images + chat-formatted text -> model inputs, and the box codec.

Box convention (the one of the whole project): outside this file a box is ``[x1, y1, x2, y2]`` in pixels of the
original (EXIF-upright) image. Here each coordinate is normalized to that image and quantized into ``num_coord_bins``
bins, ``bin = min(floor(v / size * N), N - 1)``, then written in one of two box formats (``box_format``, fixed at build
time and stored in the checkpoint):

- ``"text"`` (the paper's): the bins as text the LLM's tokenizer already has, ``[x1, y1, x2, y2]``, e.g.
  ``[123, 45, 678, 900]`` with N = 1000; several boxes are joined by ``", "``. A pretrained LLM reads numbers from
  its own pretraining, so a stage-1 LLM that stays frozen still understands the box in the prompt.
- ``"tokens"``: 6 new vocabulary entries per box, ``<box><coord_x1><coord_y1><coord_x2><coord_y2></box>``; shorter
  (6 tokens instead of ~15-20) but the LLM must learn what the new rows mean.

Decoding returns bin centres in original pixels, so a round trip is exact to within half a bin. Coordinate tokens are
ordinary *added* tokens, not special ones: ``skip_special_tokens=True`` (used by the image-text-to-text pipeline) would
otherwise erase every predicted box.

Text from users (captions, questions) is marked untrusted with two private-use characters, and control strings inside
it (``<image>``, ``<box>``, ``<coord_17>``, role tokens, ...) are tokenized as plain text, never as those tokens. The
markers never reach the model and never appear in decoded text (``decode``, ``batch_decode`` and the pipeline's
``post_process_image_text_to_text`` drop them).

One prompt whatever the entry point: a user message that is not a prompt builder's string (plain ``text=``, chat
messages through ``apply_chat_template``, ``pipeline("image-text-to-text")``) is read as a task request against this
checkpoint's templates (``parse_request``): ``caption2bbox_template`` with any caption becomes
``caption2bbox_prompt(caption)`` (only the caption untrusted), ``bbox2caption_template`` around a well-formed box of the
box format becomes the Bbox2Caption prompt (the box stays a box), anything else is plain untrusted text, as
``vqa_prompt`` writes it. So the token ids equal the prompt builders' for the same request (tests/test_prompts.py).
The chat template marks nothing as untrusted itself: it delimits each user text part with a second pair of private-use
characters, and the processor reads what is inside.
"""

import itertools
import re
from typing import TypedDict, Unpack

import torch
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs

from .box_codec_granvit import BOX_END, BOX_FORMATS, BOX_START, TEXT_BOX_SEPARATOR, BoxCodec, coord_token  # noqa: F401
from .box_utils_granvit import check_box
from .tiling_granvit import view_markers

IMAGE_TOKEN = "<image>"
USER_TOKEN, ASSISTANT_TOKEN = "<|user|>", "<|assistant|>"
# Private-use code points delimiting untrusted text inside a prompt string, and (written by the chat template) a user
# message for the processor to read as a task request (`user_message`).
UNTRUSTED_START, UNTRUSTED_END = "\ue000", "\ue001"
REQUEST_START, REQUEST_END = "\ue002", "\ue003"
MARKERS = (UNTRUSTED_START, UNTRUSTED_END, REQUEST_START, REQUEST_END)
# The Caption2Bbox answer for a phrase that names nothing in the image (checkpoints trained with negatives:
# grounding_granvit.py); plain text in the LLM's own tokens.
NOT_FOUND_ANSWER = "not found"

BBOX2CAPTION_TEMPLATE = (
    "Describe the content contained within the normalized bounding box coordinates {box} in no more than 10 words."
)
CAPTION2BBOX_TEMPLATE = "Please provide the bounding box coordinate of the region this sentence describes: {caption}"
VQA_TEMPLATE = "{question}"

# Each user text part is delimited as a user message (its own delimiters removed first); the processor decides what in
# it is untrusted (`user_message`). Other roles' text (assistant answers, system prompts) is taken as written.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' and message['role'] == 'user' -%}"
    "{{- '\ue002' + part['text'] | replace('\ue002', '') | replace('\ue003', '') + '\ue003' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


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


class GranViTProcessor(ProcessorMixin):
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
        self._added_token_pattern = None

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
        vocab = tokenizer.get_vocab()
        special = [t for t in (IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN) if t not in vocab]
        if special:
            tokenizer.add_special_tokens({"extra_special_tokens": special}, replace_extra_special_tokens=False)
        ids = {"image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
        if box_format == "tokens":
            tokenizer.add_tokens(BoxCodec(num_coord_bins, box_format).added_tokens())
            ids.update(
                box_start_token_id=tokenizer.convert_tokens_to_ids(BOX_START),
                box_end_token_id=tokenizer.convert_tokens_to_ids(BOX_END),
                coord_token_start_id=tokenizer.convert_tokens_to_ids(coord_token(0)),
            )
        elif box_format != "text":
            raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return ids

    # ---- boxes --------------------------------------------------------------------------------------------------
    @staticmethod
    def validate_box(box, image_size: tuple[int, int]) -> list[float]:
        """Check a pixel box against its image; returns it as floats or raises ValueError naming the box and rule."""
        return check_box(box, image_size)

    @property
    def codec(self) -> BoxCodec:
        """The box codec of this checkpoint (bins and box format): box_codec_granvit.py."""
        return BoxCodec(self.num_coord_bins, self.box_format)

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

    # ---- prompts ------------------------------------------------------------------------------------------------
    @staticmethod
    def plain_text(text: str) -> str:
        """Mark user text as untrusted: control strings inside it are tokenized as plain text."""
        return UNTRUSTED_START + GranViTProcessor.strip_markers(str(text)) + UNTRUSTED_END

    def bbox2caption_prompt(self, box, image_size: tuple[int, int]) -> str:
        """Bbox2Caption user message (stage 1): describe the region in the box."""
        return self._bbox2caption_prompt(self.box_to_bins(box, image_size))

    def _bbox2caption_prompt(self, bins: list[int]) -> str:
        # The empty untrusted pair marks the string as a prompt builder's (`user_message`): its box tokens are real.
        return self.bbox2caption_template.replace("{box}", self.format_bins(bins)) + self.plain_text("")

    def caption2bbox_prompt(self, caption: str) -> str:
        """Caption2Bbox user message (stage 2): find the region a caption describes."""
        return self.caption2bbox_template.replace("{caption}", self.plain_text(caption))

    def vqa_prompt(self, question: str) -> str:
        return self.vqa_template.replace("{question}", self.plain_text(question))

    def parse_request(self, text: str) -> tuple[str, str | list[int]]:
        """What a user message asks, read against this checkpoint's templates: ``("caption2bbox", caption)``,
        ``("bbox2caption", bins)`` (a well-formed box of the box format where the template has ``{box}``),
        ``("vqa", question)`` or, matching none, ``("text", text)``. A template matches the whole message exactly."""
        caption = _template_match(self.caption2bbox_template, "{caption}", text, r"(.+)")
        if caption:
            return "caption2bbox", caption.group(1)
        box = _template_match(self.bbox2caption_template, "{box}", text, self.box_pattern.pattern)
        if box:
            bins = [int(g) for g in box.groups()]
            if max(bins) < self.num_coord_bins and bins[2] >= bins[0] and bins[3] >= bins[1]:
                return "bbox2caption", bins
        question = _template_match(self.vqa_template, "{question}", text, r"(.+)")
        if question:
            return "vqa", question.group(1)
        return "text", text

    def user_message(self, text: str) -> str:
        """A user message -> the prompt string a prompt builder writes for the same request.

        A prompt builder's string (it holds untrusted-text markers) is kept, unless its trusted part would put a
        special token (``<image>``, a role token, eos, ...) into the user turn: then, like any other text, it is read
        by ``parse_request`` and rewritten by the builder of what it asks; text that is no task request becomes plain
        untrusted text."""
        if UNTRUSTED_START in text and not self._trusted_special_tokens(text):
            return text
        task, value = self.parse_request(self.strip_markers(text))
        if task == "caption2bbox":
            return self.caption2bbox_prompt(value)
        if task == "bbox2caption":
            return self._bbox2caption_prompt(value)
        if task == "vqa":
            return self.vqa_prompt(value)
        return self.plain_text(value)

    def _trusted_special_tokens(self, text: str) -> list[int]:
        """Special-token ids the trusted (unmarked) parts of a prompt string would produce (box tokens are not
        special)."""
        roles = self.tokenizer.convert_tokens_to_ids([USER_TOKEN, ASSISTANT_TOKEN])
        special = set(self.tokenizer.all_special_ids) | {self.image_token_id, *roles}
        trusted = "".join(re.split(f"{UNTRUSTED_START}.*?{UNTRUSTED_END}", text, flags=re.DOTALL))
        ids = self.tokenizer(self.strip_markers(trusted), add_special_tokens=False)["input_ids"]
        return [i for i in ids if i in special]

    def _read_requests(self, chat: str) -> str:
        """Chat text (a rendered chat template) with each delimited user message replaced by ``user_message``'s."""
        return re.sub(f"{REQUEST_START}(.*?){REQUEST_END}", lambda m: self.user_message(m.group(1)), chat,
                      flags=re.DOTALL)

    def format_user_turn(self, prompt: str, num_images: int = 1) -> str:
        """A user message -> chat text up to the assistant's turn, with ``<image>`` placeholders in front."""
        message = self.user_message(prompt)
        return USER_TOKEN + IMAGE_TOKEN * num_images + message + self.tokenizer.eos_token + ASSISTANT_TOKEN

    def _chat(self, text: str, num_images: int) -> str:
        return self._read_requests(text) if text.startswith(USER_TOKEN) else self.format_user_turn(text, num_images)

    # ---- "not found" -------------------------------------------------------------------------------------------
    @property
    def not_found_target(self) -> str:
        """The training target of a Caption2Bbox query whose caption names nothing in the image."""
        return self.plain_text(self.not_found_answer)

    @property
    def not_found_ids(self) -> list[int]:
        """Token ids of the "not found" answer, exactly as the training target has them (without the eos)."""
        return self._encode(self.not_found_target)

    def is_not_found(self, text) -> bool:
        """Whether a decoded grounding answer is the "not found" answer."""
        return isinstance(text, str) and text.strip() == self.not_found_answer

    # ---- tokenization -------------------------------------------------------------------------------------------
    def _plain_ids(self, text: str) -> list[int]:
        """Tokenize untrusted text so that no added/special token can be produced from it."""
        if self._added_token_pattern is None:
            added = sorted(self.tokenizer.get_added_vocab(), key=len, reverse=True)
            self._added_token_pattern = re.compile("|".join(re.escape(t) for t in added)) if added else None
        pieces, rest = [], text
        while rest:
            match = self._added_token_pattern.search(rest) if self._added_token_pattern else None
            if match is None:
                pieces.append(rest)
                break
            # Cut one character into the control string: neither side can then form it.
            pieces.append(rest[: match.start() + 1])
            rest = rest[match.start() + 1 :]
        ids = []
        for piece in pieces:
            ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

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
            segment = self.strip_markers(segment)
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
            sequences, labels = self._truncate(sequences, labels, options.get("max_length"), per_sample_images,
                                               per_sample_grids)
        side = options.get("padding_side") or ("right" if targets is not None else "left")
        data = self._pad(sequences, labels, side, options)
        if options.get("return_attention_mask") is False:
            del data["attention_mask"]

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

    def _truncate(self, sequences, labels, max_length, per_sample_images, per_sample_grids):
        """Cut each sequence (and its labels) to ``max_length`` on the tokenizer's ``truncation_side``; a cut into
        the image tokens is an error (the model needs all of them)."""
        max_length = max_length or self.tokenizer.model_max_length
        cut = (lambda x: x[-max_length:]) if self.tokenizer.truncation_side == "left" else (lambda x: x[:max_length])
        sequences = [cut(s) for s in sequences]
        for seq, imgs, grids in zip(sequences, per_sample_images, per_sample_grids):
            expected = sum(self.image_token_ids(g).count(self.image_token_id) for g in (grids or [None] * len(imgs)))
            if seq.count(self.image_token_id) != expected:
                raise ValueError(
                    f"max_length={max_length} cuts into the image tokens ({len(imgs)} image(s), {expected} "
                    "image tokens); raise max_length"
                )
        return sequences, None if labels is None else [cut(lab) for lab in labels]

    def _pad(self, sequences: list[list[int]], labels: list[list[int]] | None, side: str, options: dict) -> dict:
        """Pad as the tokenizer would for ``padding`` / ``max_length`` / ``pad_to_multiple_of``; lists when a batch
        stays ragged (``padding=False``), which only ``return_tensors=None`` can return."""
        padding = options.get("padding")
        padding = "longest" if padding is True else "do_not_pad" if padding in (False, None) else str(padding)
        longest, max_length = max(len(s) for s in sequences), options.get("max_length")
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            if longest > max_length:
                raise ValueError(f"a prompt has {longest} tokens, more than max_length={max_length}; pass truncation=True")
            longest = max_length
        if options.get("pad_to_multiple_of"):
            longest = -(-longest // options["pad_to_multiple_of"]) * options["pad_to_multiple_of"]
        if padding == "do_not_pad":
            if len({len(s) for s in sequences}) > 1 and options.get("return_tensors") is not None:
                raise ValueError("prompts of different lengths cannot become tensors without padding: pass padding=True "
                                 "or return_tensors=None")
            data = {"input_ids": [list(s) for s in sequences], "attention_mask": [[1] * len(s) for s in sequences]}
            if labels is not None:
                data["labels"] = [list(lab) for lab in labels]
            return data
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        def pad(row, value):
            fill = [value] * (longest - len(row))
            return fill + list(row) if side == "left" else list(row) + fill

        data = {"input_ids": [pad(s, pad_id) for s in sequences],
                "attention_mask": [pad([1] * len(s), 0) for s in sequences]}
        if labels is not None:
            data["labels"] = [pad(lab, -100) for lab in labels]
        return data

    # ---- decoding -----------------------------------------------------------------------------------------------
    @staticmethod
    def strip_markers(text):
        """Text (or a list of texts) without the untrusted-text markers: what a person should read."""
        if isinstance(text, str):
            return re.sub(f"[{''.join(MARKERS)}]", "", text)
        return [GranViTProcessor.strip_markers(t) for t in text]

    def decode(self, *args, **kwargs):
        return self.strip_markers(self.tokenizer.decode(*args, **kwargs))

    def batch_decode(self, *args, **kwargs):
        return self.strip_markers(self.tokenizer.batch_decode(*args, **kwargs))

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        texts = super().post_process_image_text_to_text(generated_outputs, skip_special_tokens, **kwargs)
        return self.strip_markers(texts)

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


def _template_match(template: str, placeholder: str, text: str, pattern: str) -> re.Match | None:
    """``text`` matched against ``template`` with its one ``placeholder`` as the regex ``pattern`` (None: no match)."""
    if template.count(placeholder) != 1:
        return None
    prefix, suffix = template.split(placeholder)
    return re.fullmatch(re.escape(prefix) + pattern + re.escape(suffix), text, flags=re.DOTALL)


__all__ = ["GranViTProcessor"]
