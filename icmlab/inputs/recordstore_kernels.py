"""The compiled (numba) pass of :func:`icmlab.inputs.recordstore.scan_modality_lengths`: one walk over a
scanned block's strings and braces that finds the keys, their brace depth and record, and counts the
words of every turn's ``value`` string in a single pass over its bytes (``str.split()`` rules).
Compiled on first use and cached next to this file (numba ``cache=True``)."""

from __future__ import annotations

import functools

import numba
import numpy as np

_njit = functools.partial(numba.njit, cache=True, nogil=True)

#: Per-record flags written by :func:`modality_words`.
HAS_IMAGE, SLOW = 1, 2
_SEEN_CONVERSATIONS = 4

_IMAGE = np.frombuffer(b"image", np.uint8)
_CONVERSATIONS = np.frombuffer(b"conversations", np.uint8)
_VALUE = np.frombuffer(b"value", np.uint8)


@numba.njit(inline="always")
def _is_ws(c):
    return c == 32 or c == 10 or c == 13 or c == 9


@numba.njit(inline="always")
def _skip_ws(a, i):
    """First offset at or after ``i`` that is not JSON whitespace (``len(a)`` if none)."""
    n = len(a)
    if i < n and not _is_ws(a[i]):  # the usual case, apart: the loop's exit is hard to predict
        return i
    while i < n and _is_ws(a[i]):
        i += 1
    return i


@numba.njit(inline="always")
def _escaped(a, op, cl):
    """Whether the string body ``a[op+1:cl]`` holds a backslash."""
    for j in range(op + 1, cl):
        if a[j] == 92:
            return True
    return False


@_njit
def _named(a, op, cl, name):
    """Whether the string body ``a[op+1:cl]`` is exactly ``name``."""
    if cl - op - 1 != len(name):
        return False
    for j in range(len(name)):
        if a[op + 1 + j] != name[j]:
            return False
    return True


# Byte-parallel arithmetic on 8 bytes at a time (little-endian: byte j of a word is bits 8j..8j+7).
_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH = np.uint64(0x8080808080808080)
_SPACES = np.uint64(0x2020202020202020)
_BSLASHES = np.uint64(0x5C5C5C5C5C5C5C5C)
_ONES = np.uint64(0x0101010101010101)
_U0, _U1, _U7, _U8, _U56, _U80 = (np.uint64(v) for v in (0, 1, 7, 8, 56, 0x80))


@numba.njit(inline="always")
def _zero_bytes(t):
    """``0x80`` in every byte of ``t`` that is zero, 0 in the others (exact: no borrow between bytes)."""
    return ~(((t & _LOW7) + _LOW7) | t) & _HIGH


@numba.njit(inline="always")
def _word_starts(x, before):
    """(words starting in the 8 bytes ``x``, their spaces): a word starts at a byte that is not a space
    and follows one; ``before`` is ``0x80`` when the byte before ``x`` is a space (or the string's start)."""
    z = _zero_bytes(x ^ _SPACES)
    st = ~z & _HIGH & ((z << _U8) | before)
    return ((st >> _U7) * _ONES) >> _U56, z  # the multiply adds the bytes' 0/1 into the top byte


@_njit
def count_words(a, w, lo, hi):
    """``len(text.split())`` of the JSON string body ``a[lo:hi]``; -1 when it holds a ``\\\\`` or ``\\u``
    escape (the caller decodes that record).

    ``w`` is ``a`` as 64-bit words. Most strings are plain ASCII: a pass over their words counts the
    space-to-non-space steps 8 bytes at a time and notes any backslash or non-ASCII byte; only strings
    with one go through :func:`_count_words_mixed`.
    """
    if hi <= lo:
        return 0
    if hi > 8 * len(w):  # the file's last bytes are no whole word
        return _count_words_exact(a, lo, hi)
    i0, i1 = lo >> 3, (hi - 1) >> 3
    # The first word: its bytes before lo count as spaces (the string's start is one).
    force = (_U1 << (_U8 * np.uint64(lo & 7))) - _U1
    if i0 == i1 and hi & 7:
        force |= ~((_U1 << (_U8 * np.uint64(hi & 7))) - _U1)
    x = (w[i0] & ~force) | (_SPACES & force)
    words, z = _word_starts(x, _U80)
    special = (x & _HIGH) | _zero_bytes(x ^ _BSLASHES)
    # The whole words between: the byte before each is the top byte of the word before, whose
    # spaces are found again (independent iterations vectorise; unsigned indices skip the
    # negative-index check).
    for i in range(np.uint64(i0 + 1), np.uint64(i1)):
        x = w[i]
        n, z = _word_starts(x, _zero_bytes(w[i - _U1] ^ _SPACES) >> _U56)
        words += n
        special |= (x & _HIGH) | _zero_bytes(x ^ _BSLASHES)
    if i1 > i0:  # the last word: its bytes from hi on count as spaces (never a word's start)
        force = ~((_U1 << (_U8 * np.uint64(hi & 7))) - _U1) if hi & 7 else _U0
        x = (w[i1] & ~force) | (_SPACES & force)
        n, z = _word_starts(x, _zero_bytes(w[i1 - 1] ^ _SPACES) >> _U56)
        words += n
        special |= (x & _HIGH) | _zero_bytes(x ^ _BSLASHES)
    if special:
        return _count_words_mixed(a, w, lo, hi)
    return np.int64(words)


_NON_WS, _WS, _CONT, _BAD = 0, 1, 2, 3  # what the byte at a position starts (see _char)


@numba.njit(inline="always")
def _char(a, i, hi):
    """(kind, bytes) of the JSON string character at ``a[i]`` (string body ending at ``hi``).

    ``\\n \\t \\r \\f`` escapes and the UTF-8 encodings of Unicode's whitespace (U+0085, U+00A0,
    U+1680, U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000) are whitespace; another escape
    (``\\" \\/ \\b``) is one character; a ``\\\\`` or ``\\u`` escape is :data:`_BAD`; a UTF-8
    continuation byte (:data:`_CONT`) belongs to the character before it.
    """
    c = a[i]
    if c == 32:
        return _WS, 1
    if c < 0x80:
        if c != 92:
            return _NON_WS, 1
        x = a[i + 1] if i + 1 < hi else 0
        if x == 92 or x == 117:  # \\ or \u: decoded by the caller
            return _BAD, 2
        return (_WS if x == 110 or x == 116 or x == 114 or x == 102 else _NON_WS), 2  # \n \t \r \f
    if c < 0xC0:
        return _CONT, 1
    n1 = a[i + 1] if i + 1 < hi else 0
    n2 = a[i + 2] if i + 2 < hi else 0
    if c == 0xC2:
        ws = n1 == 0x85 or n1 == 0xA0
    elif c == 0xE1:
        ws = n1 == 0x9A and n2 == 0x80
    elif c == 0xE2:
        if n1 == 0x80:
            ws = (0x80 <= n2 <= 0x8A) or n2 == 0xA8 or n2 == 0xA9 or n2 == 0xAF
        else:
            ws = n1 == 0x81 and n2 == 0x9F
    elif c == 0xE3:
        ws = n1 == 0x80 and n2 == 0x80
    else:
        ws = False
    return (_WS if ws else _NON_WS), 1


@numba.njit(inline="always")
def _walk(a, j, end, hi, prev_ws, words):
    """Characters from ``a[j]`` on while ``j < end``: (offset reached, whether the last character is
    whitespace, words so far); offset -1 at a :data:`_BAD` escape."""
    while j < end:
        kind, step = _char(a, j, hi)
        if kind == _BAD:
            return -1, prev_ws, words
        if kind != _CONT:
            if prev_ws and kind == _NON_WS:
                words += 1
            prev_ws = kind == _WS
        j += step
    return j, prev_ws, words


@_njit
def _count_words_exact(a, lo, hi):
    """:func:`count_words` character by character (see :func:`_char`)."""
    j, _, words = _walk(a, lo, hi, hi, True, 0)
    return -1 if j < 0 else words


@_njit
def _count_words_mixed(a, w, lo, hi):
    """:func:`count_words` of a string with a backslash or a non-ASCII byte: whole plain words 8 bytes
    at a time, the others (and the partial words at both ends) character by character."""
    i0, i1 = lo >> 3, (hi - 1) >> 3
    words, prev_ws, pos = 0, True, lo  # pos: the next character's offset (an escape may cross words)
    for i in range(i0, i1 + 1):
        base = 8 * i
        if pos <= base and base + 8 <= hi:
            x = w[i]
            if not ((x & _HIGH) | _zero_bytes(x ^ _BSLASHES)):
                n, z = _word_starts(x, _U80 if prev_ws else _U0)
                words += n
                prev_ws = (z >> _U56) != _U0
                pos = base + 8
                continue
        pos, prev_ws, words = _walk(a, max(pos, base), min(base + 8, hi), hi, prev_ws, words)
        if pos < 0:
            return -1
    return words


@_njit
def modality_words(a, w, q, br, depth, starts, words, flags):
    """Words of every record's turns and its flags (:data:`HAS_IMAGE`, :data:`SLOW`), from a scanned block.

    Args:
        a: the file's bytes; w: its whole 64-bit words (``a[:len(a) // 8 * 8]`` viewed as uint64).
        q: the block's unescaped quotes (pairs: each string's opening and closing quote).
        br, depth: the braces outside strings and the brace depth after each.
        starts: each record's ``{`` offset.
        words, flags: outputs, one entry per record (zeroed by the caller).

    A key is a string followed by ``:``; its depth is the brace depth around it. ``image`` and
    ``conversations`` are keys at depth 1; a turn's ``value`` is a key at depth 2 whose last depth-1
    key before it is its record's ``conversations``. :data:`SLOW` marks the records these rules
    cannot settle: duplicate ``conversations``, one that is not an array, a ``value`` that is not a
    string or appears twice in one turn, a ``\\\\`` or ``\\u`` escape in a value, an escape in a key
    at depth 1 or 2 (``"im\\u0061ge"`` is ``image``).
    """
    n, nbr, size = len(starts), len(br), len(a)
    r, bi, turn = -1, 0, -1  # record of the current string, braces before it, depth-2 objects opened
    owner_rec, owner_conv = -1, False  # the last depth-1 key: its record, whether it is "conversations"
    last_turn = -1  # the turn of the last value counted
    nq = len(q) // 2
    k = 0
    while k < nq:
        op, cl = q[2 * k], q[2 * k + 1]
        k += 1
        colon = _skip_ws(a, cl + 1)
        if colon >= size or a[colon] != 58:  # not a key (a string value in an array)
            continue
        v = _skip_ws(a, colon + 1)
        string = k < nq and q[2 * k] == v  # the value is the next string
        if string:
            k += 1  # a value is no key: skip it
        while bi < nbr and br[bi] < op:
            if depth[bi] == 2 and a[br[bi]] == 123:  # "{" opening a turn (or another depth-2 object)
                turn += 1
            bi += 1
        while r + 1 < n and starts[r + 1] <= op:
            r += 1
        if r < 0:
            continue
        d = depth[bi - 1] if bi > 0 else 0
        # A key that may decode to a name (a letter's escape is \uXXXX: 10 bytes at least): the parser decides.
        if (d == 1 or d == 2) and cl - op > 10 and _escaped(a, op, cl):
            flags[r] |= SLOW
        if d == 1:
            owner_rec, owner_conv = r, _named(a, op, cl, _CONVERSATIONS)
            if owner_conv:
                if flags[r] & _SEEN_CONVERSATIONS:  # a second one: the parser keeps the last one
                    flags[r] |= SLOW
                flags[r] |= _SEEN_CONVERSATIONS
                if v >= size or a[v] != 91:  # not an array
                    flags[r] |= SLOW
            elif _named(a, op, cl, _IMAGE):
                flags[r] |= HAS_IMAGE
        elif d == 2 and owner_conv and owner_rec == r and _named(a, op, cl, _VALUE):
            if not string:  # a number, null, an object...
                flags[r] |= SLOW
                continue
            if turn == last_turn:  # a second "value" in one turn: the parser keeps the last one
                flags[r] |= SLOW
            last_turn = turn
            nw = count_words(a, w, v + 1, q[2 * k - 1])
            if nw < 0:
                flags[r] |= SLOW
            else:
                words[r] += nw
    for i in range(n):
        flags[i] &= HAS_IMAGE | SLOW
