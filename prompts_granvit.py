"""GranViT's chat format and task prompts: the prompt builders, untrusted user text, and reading a request.

Text from users (captions, questions) is marked untrusted with two private-use characters, and control strings inside
it (``<image>``, ``<box>``, ``<coord_17>``, role tokens, ...) are tokenized as plain text, never as those tokens. The
markers never reach the model and never appear in decoded text (the processor's ``decode``, ``batch_decode`` and the
pipeline's ``post_process_image_text_to_text`` drop them).

One prompt whatever the entry point: a user message that is not a prompt builder's string (plain ``text=``, chat
messages through ``apply_chat_template``, ``pipeline("image-text-to-text")``) is read as a task request against this
checkpoint's templates (``parse_request``): ``caption2bbox_template`` with any caption becomes
``caption2bbox_prompt(caption)`` (only the caption untrusted), ``bbox2caption_template`` around a well-formed box of the
box format becomes the Bbox2Caption prompt (the box stays a box), anything else is plain untrusted text, as
``vqa_prompt`` writes it. So the token ids equal the prompt builders' for the same request (tests/test_prompts.py).
The chat template marks nothing as untrusted itself: it delimits each user text part with a second pair of private-use
characters, and the processor reads what is inside.

A Hub file: ``GranViTPromptsMixin`` is a base of ``GranViTProcessor`` (processing_granvit.py), which ships it in every
checkpoint; it imports nothing but the standard library.
"""

import re

IMAGE_TOKEN = "<image>"
USER_TOKEN, ASSISTANT_TOKEN = "<|user|>", "<|assistant|>"  # the chat template writes "<|" + role + "|>"
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
    f"{{%- if part['type'] == 'image' -%}}{{{{- '{IMAGE_TOKEN}' -}}}}"
    "{%- elif part['type'] == 'text' and message['role'] == 'user' -%}"
    f"{{{{- '{REQUEST_START}' + part['text'] | replace('{REQUEST_START}', '') | replace('{REQUEST_END}', '')"
    f" + '{REQUEST_END}' -}}}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- eos_token -}}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{{{{- '{ASSISTANT_TOKEN}' -}}}}{{%- endif -%}}"
)


def plain_text(text: str) -> str:
    """Mark user text as untrusted: control strings inside it are tokenized as plain text."""
    return UNTRUSTED_START + strip_markers(str(text)) + UNTRUSTED_END


def strip_markers(text):
    """Text (or a list of texts) without the untrusted-text markers: what a person should read."""
    if isinstance(text, str):
        return re.sub(f"[{''.join(MARKERS)}]", "", text)
    return [strip_markers(t) for t in text]


def template_match(template: str, placeholder: str, text: str, pattern: str) -> re.Match | None:
    """``text`` matched against ``template`` with its one ``placeholder`` as the regex ``pattern`` (None: no match)."""
    if template.count(placeholder) != 1:
        return None
    prefix, suffix = template.split(placeholder)
    return re.fullmatch(re.escape(prefix) + pattern + re.escape(suffix), text, flags=re.DOTALL)


class GranViTPromptsMixin:
    """The processor's prompt builders, request reading and untrusted text (tokenized as plain text, its markers
    dropped from decoded text). Needs ``tokenizer``, ``codec`` (box_codec_granvit.py), ``image_token_id``, the three
    templates, ``not_found_answer`` and ``_encode`` from the processor, and a base with
    ``post_process_image_text_to_text`` (transformers' ``ProcessorMixin``)."""

    plain_text = staticmethod(plain_text)
    strip_markers = staticmethod(strip_markers)

    # ---- prompt builders --------------------------------------------------------------------------------------------
    def bbox2caption_prompt(self, box, image_size: tuple[int, int]) -> str:
        """Bbox2Caption user message (stage 1): describe the region in the box."""
        return self._bbox2caption_prompt(self.codec.quantize(box, image_size))

    def _bbox2caption_prompt(self, bins: list[int]) -> str:
        # The empty untrusted pair marks the string as a prompt builder's (`user_message`): its box tokens are real.
        return self.bbox2caption_template.replace("{box}", self.codec.format_bins(bins)) + plain_text("")

    def caption2bbox_prompt(self, caption: str) -> str:
        """Caption2Bbox user message (stage 2): find the region a caption describes."""
        return self.caption2bbox_template.replace("{caption}", plain_text(caption))

    def vqa_prompt(self, question: str) -> str:
        return self.vqa_template.replace("{question}", plain_text(question))

    # ---- reading a request ------------------------------------------------------------------------------------------
    def parse_request(self, text: str) -> tuple[str, str | list[int]]:
        """What a user message asks, read against this checkpoint's templates: ``("caption2bbox", caption)``,
        ``("bbox2caption", bins)`` (a well-formed box of the box format where the template has ``{box}``),
        ``("vqa", question)`` or, matching none, ``("text", text)``. A template matches the whole message exactly."""
        caption = template_match(self.caption2bbox_template, "{caption}", text, r"(.+)")
        if caption:
            return "caption2bbox", caption.group(1)
        box = template_match(self.bbox2caption_template, "{box}", text, self.codec.pattern.pattern)
        if box and self.codec.valid_bins([int(g) for g in box.groups()]):
            return "bbox2caption", [int(g) for g in box.groups()]
        question = template_match(self.vqa_template, "{question}", text, r"(.+)")
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
        task, value = self.parse_request(strip_markers(text))
        if task == "caption2bbox":
            return self.caption2bbox_prompt(value)
        if task == "bbox2caption":
            return self._bbox2caption_prompt(value)
        if task == "vqa":
            return self.vqa_prompt(value)
        return plain_text(value)

    def _trusted_special_tokens(self, text: str) -> list[int]:
        """Special-token ids the trusted (unmarked) parts of a prompt string would produce (box tokens are not
        special)."""
        roles = self.tokenizer.convert_tokens_to_ids([USER_TOKEN, ASSISTANT_TOKEN])
        special = set(self.tokenizer.all_special_ids) | {self.image_token_id, *roles}
        trusted = "".join(re.split(f"{UNTRUSTED_START}.*?{UNTRUSTED_END}", text, flags=re.DOTALL))
        ids = self.tokenizer(strip_markers(trusted), add_special_tokens=False)["input_ids"]
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

    # ---- untrusted text in, markers out ----------------------------------------------------------------------------
    def _plain_ids(self, text: str) -> list[int]:
        """Tokenize untrusted text so that no added/special token can be produced from it."""
        if getattr(self, "_added_token_pattern", None) is None:  # built once per processor
            added = sorted(self.tokenizer.get_added_vocab(), key=len, reverse=True)
            self._added_token_pattern = re.compile("|".join(re.escape(t) for t in added) or r"(?!)")
        pieces, rest = [], text
        while rest:
            match = self._added_token_pattern.search(rest)
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

    def decode(self, *args, **kwargs):
        return strip_markers(self.tokenizer.decode(*args, **kwargs))

    def batch_decode(self, *args, **kwargs):
        return strip_markers(self.tokenizer.batch_decode(*args, **kwargs))

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return strip_markers(super().post_process_image_text_to_text(generated_outputs, skip_special_tokens, **kwargs))

    # ---- "not found" ------------------------------------------------------------------------------------------------
    @property
    def not_found_target(self) -> str:
        """The training target of a Caption2Bbox query whose caption names nothing in the image."""
        return plain_text(self.not_found_answer)

    @property
    def not_found_ids(self) -> list[int]:
        """Token ids of the "not found" answer, exactly as the training target has them (without the eos)."""
        return self._encode(self.not_found_target)

    def is_not_found(self, text) -> bool:
        """Whether a decoded grounding answer is the "not found" answer."""
        return isinstance(text, str) and text.strip() == self.not_found_answer


__all__ = [
    "ASSISTANT_TOKEN", "BBOX2CAPTION_TEMPLATE", "CAPTION2BBOX_TEMPLATE", "CHAT_TEMPLATE", "GranViTPromptsMixin",
    "IMAGE_TOKEN", "MARKERS", "NOT_FOUND_ANSWER", "REQUEST_END", "REQUEST_START", "UNTRUSTED_END", "UNTRUSTED_START",
    "USER_TOKEN", "VQA_TEMPLATE", "plain_text", "strip_markers",
]
