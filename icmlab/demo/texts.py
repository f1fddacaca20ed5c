"""Fixed texts of the demo datasets: questions, options, answers, prompt paraphrases.

The decisive questions have ONE text for every class (only the image can answer them), and the
held-out evaluation sets reuse exactly these strings. The tokenizer is trained on
:func:`tokenizer_corpus`, which draws from the same constants, so every demo prompt tokenizes into
few tokens and the answers (" A" … " E", " Yes", " No") are single tokens.
"""

from __future__ import annotations

from .images import DISTORTIONS, PALETTE, SHAPE_KINDS, SYMBOL_POSITIONS

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's multiple-choice instruction, as used by Q-Instruct and Q-Bench."""

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
"""LLaVA-1.5's VQA instruction (VQAv2, GQA, OCR-VQA records of llava_v1_5_mix665k)."""

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATE_PIECES = ("USER:", " ASSISTANT:", "USER: ", " ASSISTANT: ", "</s>", "\n")

LETTERS = "ABCDEFGH"

# ---- quality (Q-Instruct style) -------------------------------------------------------------
DISTORTION_QUESTION = "What distortion does this image have?"
DISTORTION_OPTIONS: tuple[str, ...] = DISTORTIONS  # blur, noise, overexposure, underexposure, none

YES_NO_QUESTIONS: dict[str, str] = {
    "blur": "Is this image blurry?",
    "noise": "Is this image noisy?",
    "overexposure": "Is this image overexposed?",
    "underexposure": "Is this image underexposed?",
}
YES_NO_OPTIONS: tuple[str, ...] = ("Yes", "No")

BRIGHTNESS_QUESTION = "How is the brightness of this image?"
BRIGHTNESS_OPTIONS: tuple[str, ...] = ("too bright", "normal", "too dark")

WHAT_QUESTION = "What is the most obvious distortion in this image?"
WHAT_ANSWERS: dict[str, str] = {
    "blur": "Blur.",
    "noise": "Noise.",
    "overexposure": "Overexposure.",
    "underexposure": "Underexposure.",
    "none": "There is no obvious distortion.",
}
HOW_QUESTION = "How is the clarity of this image?"
HOW_ANSWERS: dict[str, str] = {
    "blur": "The clarity is low, the edges are blurry.",
    "noise": "The clarity is low, the image is covered with noise.",
    "overexposure": "The clarity is fair, but the image is too bright.",
    "underexposure": "The clarity is fair, but the image is too dark.",
    "none": "The clarity is high, the edges are sharp.",
}
DESCRIBE_PROMPTS: tuple[str, ...] = (
    "Describe the quality of this image.",
    "Evaluate the quality of this image and explain your reasons.",
    "How would you describe the quality of this image?",
    "Give a short description of the low-level quality of this image.",
)
DISTORTION_SENTENCES: dict[str, str] = {
    "blur": "The image is blurry, and the fine textures are lost.",
    "noise": "The image is noisy, with grain spread over the whole picture.",
    "overexposure": "The image is overexposed, and the bright areas are washed out.",
    "underexposure": "The image is underexposed, and the dark areas hide the details.",
    "none": "The image is sharp, clean and well exposed.",
}
QUALITY_VERDICTS: dict[str, str] = {
    "good": "Thus, the quality of this image is good.",
    "poor": "Thus, the quality of this image is poor.",
}
FOLLOW_UP_QUESTION = "Which distortion lowers its quality the most?"

# ---- moderation (ICM-Instruct style) --------------------------------------------------------
MODERATION_QUESTION = "Does this image contain the forbidden symbol?"
LOCATION_QUESTION = "Where is the forbidden symbol in this image?"
LOCATION_ANSWERS: dict[str | None, str] = {
    "upper": "It is in the upper part of the image.",
    "middle": "It is in the middle of the image.",
    "lower": "It is in the lower part of the image.",
    None: "There is no forbidden symbol in this image.",
}
VIOLATION_MC_QUESTION = "Does this image violate the rule?"
VIOLATION_MC_OPTIONS: tuple[str, ...] = (
    "Yes, it shows the forbidden symbol",
    "No, it is harmless",
)
LOCATION_MC_QUESTION = "Where is the forbidden symbol?"
LOCATION_MC_OPTIONS: tuple[str, ...] = ("upper part", "middle", "lower part", "nowhere")
MC_LETTER_INSTRUCTIONS: tuple[str, ...] = (
    "Answer with the option's letter from the given choices directly.",
    "Reply with the letter of the correct option only.",
    "Choose the right option and answer with its letter.",
    "Respond with the letter of your choice.",
    "Select the best answer and give only its letter.",
)
MODERATION_PROMPTS: tuple[str, ...] = (
    "Does this image break the rule? Explain why.",
    "Evaluate whether this image violates the moderation rule and explain.",
    "Is this image acceptable under the rule? Give your reasons.",
    "Check this image against the rule and explain your decision.",
    "Explain whether this image should be flagged by the moderator.",
    "Describe this image and judge whether it is harmful under the rule.",
    "Would this image pass the content check? Explain.",
    "Assess the image for the forbidden symbol and explain your judgement.",
)
RULE_SENTENCES: dict[str | None, str] = {
    "upper": "A small red X, the forbidden symbol, appears in the upper part, so the image violates the rule.",
    "middle": "A small red X, the forbidden symbol, appears in the middle, so the image violates the rule.",
    "lower": "A small red X, the forbidden symbol, appears in the lower part, so the image violates the rule.",
    None: "No forbidden symbol is visible, so the image is harmless.",
}


def mc_prompt(question: str, options: tuple[str, ...] | list[str], instruction: str = MC_INSTRUCTION) -> str:
    """Render ``question``, the lettered options and the instruction, one per line."""
    lines = [question] + [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines + [instruction])


SHAPE_NOUNS: dict[str, str] = {
    "rectangle": "rectangle",
    "ellipse": "ellipse",
    "line": "line",
    "stripes": "striped patch",
    "checker": "checkered patch",
}
"""How the texts name each shape kind."""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_phrase(colour: str, kind: str, count: int = 1) -> str:
    """``"an orange ellipse"``, ``"two striped patches"``-style phrase for ``count`` shapes."""
    noun = SHAPE_NOUNS[kind]
    if count == 1:
        return f"{_article(colour)} {colour} {noun}"
    words = {2: "two", 3: "three", 4: "four", 5: "five"}
    plural = noun + ("es" if noun.endswith("h") else "s")
    return f"{words[count]} {colour} {plural}"


MAX_SCENE_PARTS = 1
"""Shape groups a description names (in drawing order); the rest are summed up as "other shapes",
which keeps descriptions short: long answers pad every batch they land in."""


def scene_phrase(shapes) -> str:
    """Short English listing of a scene's shapes, e.g. ``"a blue ellipse and two green lines"``.

    At most :data:`MAX_SCENE_PARTS` groups are named, in drawing order; further shapes become
    ``"other shapes"``.
    """
    counts: dict[tuple[str, str], int] = {}
    for s in shapes:
        counts[(s.colour, s.kind)] = counts.get((s.colour, s.kind), 0) + 1
    parts = [shape_phrase(colour, kind, n) for (colour, kind), n in counts.items()]
    if len(parts) > MAX_SCENE_PARTS:
        parts = parts[:MAX_SCENE_PARTS] + ["other shapes"]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def tokenizer_corpus() -> list[str]:
    """Strings the demo tokenizer is trained on: system prompts, template pieces, every fixed
    question/option/answer, and phrase fragments of the generated descriptions.

    The answers are repeated so that byte-level BPE merges them into single tokens.
    """
    texts: list[str] = [VICUNA_V1_SYSTEM, LLAVA_V1_SYSTEM, MC_INSTRUCTION, SHORT_ANSWER_INSTRUCTION]
    texts += [f"USER: {q} ASSISTANT: {a}" for q, a in (("hi", "Hello."), ("ok", "Yes."))]
    texts += list(TEMPLATE_PIECES)
    texts += [DISTORTION_QUESTION, BRIGHTNESS_QUESTION, WHAT_QUESTION, HOW_QUESTION, FOLLOW_UP_QUESTION]
    texts += list(YES_NO_QUESTIONS.values()) + list(WHAT_ANSWERS.values()) + list(HOW_ANSWERS.values())
    texts += list(DESCRIBE_PROMPTS) + list(DISTORTION_SENTENCES.values()) + list(QUALITY_VERDICTS.values())
    texts += [MODERATION_QUESTION, LOCATION_QUESTION, VIOLATION_MC_QUESTION, LOCATION_MC_QUESTION]
    texts += list(LOCATION_ANSWERS.values()) + list(MC_LETTER_INSTRUCTIONS) + list(MODERATION_PROMPTS)
    texts += list(RULE_SENTENCES.values())
    texts.append(mc_prompt(DISTORTION_QUESTION, DISTORTION_OPTIONS))
    texts.append(mc_prompt(BRIGHTNESS_QUESTION, BRIGHTNESS_OPTIONS))
    texts.append(mc_prompt(VIOLATION_MC_QUESTION, VIOLATION_MC_OPTIONS))
    texts.append(mc_prompt(LOCATION_MC_QUESTION, LOCATION_MC_OPTIONS))
    texts += [f"The image shows {shape_phrase(c, k)}." for c in PALETTE for k in SHAPE_KINDS]
    texts += [f"In the {p} part." for p in SYMBOL_POSITIONS]
    texts += ["It shows a blue ellipse and other shapes."] * 5
    # The single-token answers, each preceded by a space as they follow "ASSISTANT:".
    answers = [f" {x}" for x in LETTERS[:5]] + [" Yes", " No"]
    texts += [" ".join(answers + [a + "." for a in answers])] * 200
    return texts
