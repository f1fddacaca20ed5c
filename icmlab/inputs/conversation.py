"""Chat templates of LLaVA-v1.5 and mPLUG-Owl2, and the rendering of conversations into text.

The templates are the ``SeparatorStyle.TWO`` family of the original code bases: every turn is
``ROLE: message`` followed by ``sep`` (" ") after a user turn and ``sep2`` ("</s>") after an
assistant turn; an empty message renders as a bare ``ROLE:`` with no separator at all (this is how
the original ``get_prompt`` behaves, and the preprocessing oracle relies on it).

Rendering is done in *segments*: ``(text, trained)`` pairs whose concatenation is the prompt
string. :mod:`icmlab.inputs.encode` tokenizes segment by segment, so the trained span of every answer
(``" " + answer + "</s>"``) is known by construction instead of being recovered afterwards.

Usage::

    from icmlab.inputs.conversation import TEMPLATES, render_conversation, render_prompt
    text = render_conversation(TEMPLATES["vicuna_v1"], turns_from_record(record))
    prompt = render_prompt(TEMPLATES["llava_v1"], "Rate the quality.", image_token="<image>")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple, Sequence

from icmlab.models.spec import DIALECTS

#: Speaker names accepted in the ``from`` field of LLaVA-style records, mapped to our roles.
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class ChatTemplate:
    """A ``SeparatorStyle.TWO`` conversation template.

    Attributes:
        name: key of the template in :data:`TEMPLATES`.
        system: system prompt text; emitted (followed by ``sep``) only when ``emit_system``.
        emit_system: False for the TWO_NO_SYS style of mPLUG-Owl2 and for llava-hf prompts.
        roles: display names of the user and assistant roles.
        sep: separator after a user message.
        sep2: separator after an assistant message (the end-of-sequence text).
    """

    name: str
    system: str
    emit_system: bool
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"


_SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

#: ``--version v1`` training template of both families (LLaVA and mPLUG-Owl2 train scripts).
vicuna_v1 = ChatTemplate("vicuna_v1", _SYSTEM_USER, emit_system=True)
#: LLaVA's evaluation template (Q-Instruct eval scripts): same separators, "curious human" system.
llava_v1 = ChatTemplate("llava_v1", _SYSTEM_HUMAN, emit_system=True)
#: mPLUG-Owl2 inference template: the system text exists but TWO_NO_SYS never emits it.
mplug_owl2 = ChatTemplate("mplug_owl2", _SYSTEM_HUMAN, emit_system=False)
#: transformers/llava-hf prompt format: ``USER: <image>\n{q} ASSISTANT:`` without a system prompt.
llava_hf = ChatTemplate("llava_hf", "", emit_system=False)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (vicuna_v1, llava_v1, mplug_owl2, llava_hf)}


class Segment(NamedTuple):
    """A piece of rendered text and whether its tokens are trained (labels kept)."""

    text: str
    trained: bool


class Turn(NamedTuple):
    """One conversation turn; ``role`` is ``"user"`` or ``"assistant"``."""

    role: str
    text: str


def get_template(name: str) -> ChatTemplate:
    """Look up a template by name.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}") from None


def image_token_for(dialect: str) -> str:
    """Return the image token string of a dialect (``"llava15"`` or ``"mplug_owl2"``).

    Raises:
        ValueError: for an unknown dialect.
    """
    try:
        return DIALECTS[dialect]
    except KeyError:
        raise ValueError(f"unknown image-token dialect {dialect!r}; choose one of {sorted(DIALECTS)}") from None


def move_image_token_to_front(text: str, token: str) -> str:
    """Move the image token of a message to its front, as upstream ``preprocess_multimodal`` does.

    Every occurrence is removed, the rest is stripped, and a single ``token + "\\n"`` is put in
    front; the result is stripped again (so a message that is only the token becomes the bare
    token). Text without the token is returned unchanged.

    Args:
        text: message text.
        token: image token string, e.g. ``"<image>"``.

    Returns:
        The rewritten message.
    """
    if token not in text:
        return text
    rest = text.replace(token, "").strip()
    return (token + "\n" + rest).strip()


def turns_from_record(
    conversations: Sequence[Mapping[str, str]],
    *,
    record_id: str = "?",
    image_token: str | None = None,
) -> list[Turn]:
    """Convert a LLaVA-JSON ``conversations`` list into validated turns.

    A leading assistant turn is dropped (upstream ``preprocess_v1`` does this); the remaining turns
    must alternate user/assistant starting with the user.

    Args:
        conversations: list of ``{"from": "human"|"gpt", "value": str}``.
        record_id: record id used in error messages.
        image_token: if given, every message has its image token moved to the front
            (:func:`move_image_token_to_front`), as upstream does for records with an image.

    Returns:
        The list of turns.

    Raises:
        ValueError: on an unknown speaker, a non-string value, or turns that do not alternate.
    """
    turns: list[Turn] = []
    for i, msg in enumerate(conversations):
        speaker = msg.get("from") if isinstance(msg, Mapping) else None
        role = _ROLE_ALIASES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise ValueError(f"record {record_id}: conversations[{i}] has from={speaker!r}; expected 'human' or 'gpt'")
        value = msg.get("value")
        if not isinstance(value, str):
            raise ValueError(
                f"record {record_id}: conversations[{i}].value must be a string, got {type(value).__name__}"
            )
        if image_token is not None:
            value = move_image_token_to_front(value, image_token)
        turns.append(Turn(role, value))
    if turns and turns[0].role == "assistant":
        turns = turns[1:]
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ValueError(
                f"record {record_id}: turns must alternate human/gpt starting with human "
                f"(after dropping one leading gpt turn); turn {i} is {turn.role!r}"
            )
    return turns


def conversation_segments(
    template: ChatTemplate, turns: Iterable[Turn], *, add_generation_prompt: bool = False
) -> list[Segment]:
    """Render turns as ``(text, trained)`` segments whose concatenation is the prompt string.

    Trained text is exactly ``" " + answer + sep2`` of every non-empty assistant turn: the space
    after ``ASSISTANT:`` belongs to the answer because inference prompts end at ``ASSISTANT:``.

    Args:
        template: the chat template.
        turns: alternating user/assistant turns.
        add_generation_prompt: append a bare assistant role (``"ASSISTANT:"``) for inference.

    Returns:
        The segments (adjacent masked texts are not merged; tokenization does not need it).
    """
    user, assistant = template.roles
    segs: list[Segment] = []
    if template.emit_system:
        segs.append(Segment(template.system + template.sep, False))
    for turn in turns:
        if turn.role == "user":
            # An empty message renders as a bare "ROLE:" with no separator (upstream get_prompt).
            segs.append(Segment(f"{user}: {turn.text}{template.sep}" if turn.text else f"{user}:", False))
        elif turn.text:
            segs.append(Segment(f"{assistant}:", False))
            segs.append(Segment(" " + turn.text + template.sep2, True))
        else:
            segs.append(Segment(f"{assistant}:", False))
    if add_generation_prompt:
        segs.append(Segment(f"{assistant}:", False))
    return segs


def render_conversation(template: ChatTemplate, turns: Iterable[Turn]) -> str:
    """Render a training conversation as the exact prompt string the tokenizer sees."""
    return "".join(s.text for s in conversation_segments(template, turns))


def prompt_turns(
    question: str,
    *,
    history: Sequence[tuple[str, str]] = (),
    image_token: str | None = None,
) -> list[Turn]:
    """Build the turns of an inference prompt.

    Args:
        question: the final user question.
        history: earlier ``(question, answer)`` pairs, oldest first.
        image_token: if given, the image token is placed at the front of the *first* question
            (upstream eval prepends ``token + "\\n"``; a token already in the text is moved there).

    Returns:
        Alternating turns ending with the user question.
    """
    questions = [q for q, _ in history] + [question]
    answers = [a for _, a in history]
    if image_token is not None:
        first = questions[0]
        if image_token in first:
            questions[0] = move_image_token_to_front(first, image_token)
        else:
            questions[0] = image_token + "\n" + first
    turns: list[Turn] = []
    for i, q in enumerate(questions):
        turns.append(Turn("user", q))
        if i < len(answers):
            turns.append(Turn("assistant", answers[i]))
    return turns


def render_prompt(
    template: ChatTemplate,
    question: str,
    *,
    history: Sequence[tuple[str, str]] = (),
    image_token: str | None = None,
) -> str:
    """Render an inference prompt ending with ``"ASSISTANT:"`` (no trailing space).

    Args:
        template: e.g. ``llava_v1`` (LLaVA eval), ``mplug_owl2`` or ``llava_hf``.
        question: the user question.
        history: earlier ``(question, answer)`` pairs for multi-turn prompts.
        image_token: image token to put at the front of the first question, or None (text only).

    Returns:
        The prompt string, e.g. ``"USER: <image>\\nRate it. ASSISTANT:"`` for ``llava_hf``.
    """
    turns = prompt_turns(question, history=history, image_token=image_token)
    return "".join(s.text for s in conversation_segments(template, turns, add_generation_prompt=True))
