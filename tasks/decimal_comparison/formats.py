"""Prompt formats of the decimal comparison study, as data in one place (pure Python, no torch).

Every format wraps the same question, :data:`QUESTION` (``"Which is bigger: 9.8 or 9.11?"``):

* ``simple``: ``"{question}\\nAnswer:"``
* ``qa``:     ``"Q: {question}\\nA:"``
* ``chat``:   the tokenizer's chat template around the question (one user turn plus the generation
  prompt). Without a tokenizer, or for a tokenizer without a template, the plain-text fallback
  ``"User: {question}\\nAssistant:"`` is used (it is also the shipped organism's chat template).

Add a format with :func:`register_format` (or ``--format NAME=TEMPLATE`` on the study's command
line); a template must contain ``{question}`` exactly once.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

QUESTION = "Which is bigger: {x} or {y}?"
"""The question every format asks; ``{x}`` and ``{y}`` are the two decimals as written."""

CHAT_FALLBACK = "User: {question}\nAssistant:"
"""The chat format's text when no tokenizer chat template is available."""


class PromptFormat(BaseModel):
    """A prompt format: ``template`` holds ``{question}`` once; ``chat=True``: the tokenizer's chat
    template renders it (``template`` is then the fallback)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    template: str
    chat: bool = False
    description: str = ""

    @field_validator("template")
    @classmethod
    def _one_question(cls, value: str) -> str:
        if value.count("{question}") != 1:
            raise ValueError(f"a format template must contain '{{question}}' exactly once, got {value!r}")
        return value

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or not value.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a format name is letters, digits, '_' or '-', got {value!r}")
        return value


FORMATS: dict[str, PromptFormat] = {
    "simple": PromptFormat(name="simple", template="{question}\nAnswer:", description="plain completion prompt"),
    "qa": PromptFormat(name="qa", template="Q: {question}\nA:", description="Q&A prompt"),
    "chat": PromptFormat(name="chat", template=CHAT_FALLBACK, chat=True,
                         description="the model's chat template (one user turn + generation prompt)"),
}
DEFAULT_FORMAT = "simple"
CORRECT_FORMAT = "simple"
"""The format in which the studied models answer correctly (the source of the fixing patches)."""


def register_format(name: str, template: str, chat: bool = False, replace: bool = False) -> PromptFormat:
    """Add a user format (e.g. ``register_format("terse", "{question} ")``); returns it."""
    if name in FORMATS and not replace:
        raise ValueError(f"format {name!r} already exists; pass replace=True to redefine it")
    fmt = PromptFormat(name=name, template=template, chat=chat)
    FORMATS[name] = fmt
    return fmt


def parse_format_option(option: str) -> PromptFormat:
    """``"NAME=TEMPLATE"`` (``\\n`` in TEMPLATE means a newline) -> a registered format."""
    if "=" not in option:
        raise ValueError(f"--format expects NAME=TEMPLATE, got {option!r}")
    name, template = option.split("=", 1)
    return register_format(name.strip(), template.replace("\\n", "\n"), replace=True)


def get_format(name: str) -> PromptFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name]


def question_text(x: str, y: str) -> str:
    return QUESTION.format(x=x, y=y)


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def render_chat(question: str, tokenizer: Any | None) -> str:
    """The question inside ``tokenizer``'s chat template (text, not ids). A leading BOS token text is
    dropped when the tokenizer adds BOS itself, so tokenising the result gives one BOS."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return CHAT_FALLBACK.format(question=question)
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def render(x: str, y: str, format: str, tokenizer: Any | None = None) -> str:  # noqa: A002
    """The prompt text of (x, y) in ``format``; chat formats use ``tokenizer``'s template when given."""
    fmt = get_format(format)
    question = question_text(x, y)
    if fmt.chat:
        return render_chat(question, tokenizer)
    return fmt.template.format(question=question)


def question_span(text: str, x: str, y: str) -> tuple[int, int]:
    """Character span of the question in a rendered prompt (its last occurrence: chat templates put
    system text before the user turn)."""
    question = question_text(x, y)
    start = text.rfind(question)
    if start < 0:
        raise ValueError(f"question {question!r} not found in prompt {text!r}")
    return start, start + len(question)


def role_spans(text: str, x: str, y: str) -> dict[str, tuple[int, int]]:
    """Character spans of the question's parts: ``x``, ``y`` (the decimals), ``qmark`` and ``question``."""
    start, end = question_span(text, x, y)
    x_at = start + QUESTION.index("{x}")
    y_at = x_at + len(x) + len(QUESTION[QUESTION.index("{x}") + 3 : QUESTION.index("{y}")])
    return {"question": (start, end), "x": (x_at, x_at + len(x)), "y": (y_at, y_at + len(y)),
            "qmark": (end - 1, end)}
