"""The vocabulary of data problems: what the validate stage finds and the inspect stage filters by.

Each kind names where it is found (file, record, image, length), whether it stops the record
(``error``) or is only reported (``warning``), what it means and how to fix it. Validate writes the
kinds into ``validation.problems.jsonl``; inspect reads them back to colour and filter samples.
"""

from __future__ import annotations

from typing import NamedTuple


class Kind(NamedTuple):
    """A problem kind: where it is found, whether it drops the record, and what to do about it."""

    level: str  # file | record | image | length
    severity: str  # error (the record cannot train as intended) | warning (reported, kept)
    description: str
    fix: str


KINDS: dict[str, Kind] = {
    "file_missing": Kind("file", "error", "the training JSON does not exist", "run the merge stage"),
    "file_html": Kind(
        "file", "error", "an HTML page saved instead of the JSON", "download through a '/resolve/' URL, not '/blob/'"
    ),
    "file_encoding": Kind(
        "file",
        "error",
        "not UTF-8 (or a byte-order mark) at the given byte offset",
        "re-encode the file as UTF-8 without BOM",
    ),
    "file_not_json": Kind("file", "error", "not valid JSON at the given byte offset", "re-download or fix the file"),
    "file_not_list": Kind("file", "error", "the top level is not a list of records", "use the LLaVA list format"),
    "file_empty": Kind(
        "file", "error", "the list holds no records (training would have 0 samples)", "check the sources"
    ),
    "file_compressed": Kind(
        "file", "error", "a compressed (gzip/zip/...) file, not JSON text", "decompress it (gunzip/unzip) first"
    ),
    "image_outside_root": Kind(
        "image",
        "error",
        "the image path is absolute or climbs out of data.root with '..'",
        "use a path below data.root",
    ),
    "image_too_large": Kind(
        "image", "error", "the header claims too many pixels (decompression bomb or corrupt)", "replace or drop it"
    ),
    "not_object": Kind("record", "error", "a list element is not a JSON object", "remove it"),
    "missing_id": Kind("record", "error", "no 'id' or an empty one", "give every record a unique id"),
    "missing_conversations": Kind(
        "record",
        "error",
        "'conversations' missing, empty or not a list",
        "add [{from: human, value}, {from: gpt, value}, ...]",
    ),
    "bad_turn": Kind("record", "error", "a turn is not {from, value} with a string value", "fix the turn"),
    "unknown_role": Kind("record", "error", "'from' is neither 'human' nor 'gpt'", "use human/gpt"),
    "first_turn_not_human": Kind(
        "record", "error", "the first turn is not 'human' (upstream silently drops it)", "start with the human turn"
    ),
    "roles_not_alternating": Kind(
        "record", "error", "two consecutive turns have the same role (upstream asserts)", "alternate human/gpt"
    ),
    "empty_value": Kind(
        "record",
        "error",
        "a turn's value is empty (an empty answer masks the whole sample upstream)",
        "fill or remove the turn",
    ),
    "no_answer": Kind("record", "error", "no non-empty gpt turn: the sample trains on nothing", "add the answer"),
    "ends_with_human": Kind(
        "record", "warning", "the last turn is 'human' (its question is never answered)", "drop the trailing turn"
    ),
    "bad_image_field": Kind(
        "record", "error", "'image' is not a non-empty string (one image per sample)", "a path relative to data.root"
    ),
    "image_token_count": Kind(
        "record",
        "error",
        "not exactly one image token in a human turn with 'image' set, or one without 'image'",
        "one image token in a human turn iff the record has an image",
    ),
    "wrong_dialect": Kind(
        "record",
        "error",
        "the other model family's image token (mPLUG-Owl2 would train text-only)",
        "re-run merge for this model family",
    ),
    "duplicate_id": Kind("record", "warning", "the id of an earlier record is reused", "make ids unique"),
    "image_missing": Kind(
        "image", "error", "the image file does not exist (exact case)", "download it or fix the path"
    ),
    "image_unreadable": Kind(
        "image", "error", "not an image PIL can open (empty, HTML, directory...)", "replace the file"
    ),
    "image_corrupt": Kind("image", "error", "truncated or corrupt: decoding fails", "re-download the file"),
    "image_format_mismatch": Kind(
        "image",
        "warning",
        "content format differs from the extension (e.g. GIF named .jpg)",
        "PIL reads it by content; rename if other tools need it",
    ),
    "image_degenerate": Kind("image", "warning", "tiny side or extreme aspect ratio", "check the image"),
    "truncated": Kind(
        "length",
        "warning",
        "longer than model_max_length: the end is cut, some answer tokens remain",
        "raise data.model_max_length or shorten",
    ),
    "image_cut": Kind(
        "length",
        "warning",
        "the cut goes through the image tokens (trained as text before the image)",
        "raise data.model_max_length",
    ),
    "answer_cut": Kind(
        "length",
        "error",
        "every answer token lies past model_max_length: trains on nothing",
        "raise data.model_max_length or shorten the prompt",
    ),
}
