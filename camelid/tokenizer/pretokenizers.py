"""Every pre-tokenizer llama.cpp knows (GGUF `tokenizer.ggml.pre`), in one table, and the splitter that runs them
exactly as llama.cpp's unicode_regex_split does.

A pre-tokenizer is a list of regexes applied in sequence: each splits every piece of the previous one into its
matches and the gaps between them. llama.cpp runs them with C++ std::regex (ECMAScript) in one of two ways,
and so does `split`, with Python's `re`:
- a regex that names Unicode categories (\\p{L}, \\p{N}, \\p{P}, \\p{M}, \\p{S}, \\p{Lu}, ...) runs on the
  *collapsed* text, where every non-ASCII code point is one byte standing for its category
  (camelid.tokenizer.unicode.collapse) and each \\p{X} becomes that byte plus X's ASCII members. So \\p{Lu}
  is every letter, and [^a-z] matches any non-ASCII letter: that is what llama.cpp computes;
- any other regex runs on the text itself, with non-ASCII whitespace turned into \\v (\\s is ASCII only).
\\s, \\d and \\w are ASCII (re.ASCII), and $ is the end of the piece. Three pseudo-regexes stand for code
llama.cpp runs instead of a regex: Kimi-K2's (`\\p{Han}+`) and AFMoE's / Tiny Aya's digit grouping.

Besides the regexes, a row says whether pieces go through GPT-2's byte alphabet (`byte_level`; False: raw UTF-8
with <0xNN> byte tokens), whether spaces become ▁ first, whether a whole piece found in the vocabulary skips
the merges (`ignore_merges`), and whether BOS is added by default.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from camelid.tokenizer.unicode import COLLAPSED, ascii_whitespace, collapse, is_letter, is_number, is_whitespace

# regexes shared by several rows (the strings are llama.cpp's, so its own fast paths apply to the same ones)
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
JAIS2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4)) + r"|\s{1,2}(?!\S)|\s{1}")
# the non-ASCII classes are written as escapes: an editor's Unicode normalisation must not change them
_DEEPSEEK_LATIN_GREEK = ("\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-"
                         "\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
                         "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-"
                         "\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18"
                         "-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
                         "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2"
                         "-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-"
                         "\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-"
                         "\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-"
                         "\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-"
                         "\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-"
                         "\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+")
_DEEPSEEK_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_YOUTU_CJK = ("[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-"
              "\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+")
_AFMOE_ASIAN = ("[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f\u2f00-\u2fdf\u0e40-"
                "\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f\ua9e0-\ua9ff\uac00-\ud7af\u1100-\u11ff]+")
BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_ASCII_PUNCT_WORD = r"[!" + '"' + r"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
DEEPSEEK3 = (_ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
O200K = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
         rf"{_CONTRACTIONS}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
YOUTU = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
         rf"{_CONTRACTIONS}?|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _cased(letter: str, contractions: str) -> str:
    """GPT-4o's regex as llama.cpp rewrites it: upper-case runs as lookahead-guarded [^a-z], lower as [^A-Z]."""
    upper, lower = rf"((?=[{letter}])([^a-z]))", rf"((?=[{letter}])([^A-Z]))"
    return (rf"[^\r\n\p{{L}}\p{{N}}]?{upper}*{lower}+{contractions}|[^\r\n\p{{L}}\p{{N}}]?{upper}+{lower}*"
            rf"{contractions}")


GPT4O = _cased(r"\p{L}", _CONTRACTIONS + "?") + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
TEKKEN = _cased(r"\p{L}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GRANITE_MULTI = (_cased(r"\p{L}\p{M}", _CONTRACTIONS + "?")
                 + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NEWLINES = r"[^\n]+|[\n]+"
# pseudo-regexes: llama.cpp runs hand-written code for these (see _CUSTOM below)
KIMI_K2 = r"\p{Han}+"
AFMOE_DIGITS = r"\p{AFMoE_digits}"
DIGITS_BY_THREE = r"\d{1,3}(?=(?:\d{3})*\b)"


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]
    byte_level: bool = True  # pieces in GPT-2's byte alphabet; False: raw UTF-8, bytes as <0xNN> tokens
    escape_spaces: bool = False  # " " -> "▁" before splitting (SentencePiece-style BPE vocabularies)
    ignore_merges: bool = False  # a piece that is a token is that token, whatever the merges say
    add_bos: bool = False  # llama.cpp's default for tokenizer.ggml.add_bos_token
    steps: tuple[Callable[..., list[tuple[int, int]]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(_step(r) for r in self.regexes))

    def __getstate__(self) -> dict:  # the steps are closures: pickle the regexes, rebuild the steps
        return {k: v for k, v in self.__dict__.items() if k != "steps"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def split(self, text: str) -> list[str]:
        """The pieces of `text`, in order (empty pieces dropped): what llama.cpp's BPE merges one at a time."""
        views: dict[str, str] = {}
        spans = [(0, len(text))]
        for step in self.steps:
            spans = [s for a, b in spans if b > a for s in step(text, views, a, b)]
        return [text[a:b] for a, b in spans if b > a]


def _ucat_class(name: str) -> str:
    """What llama.cpp puts for \\p{name} in a collapsed regex: the category's byte and its ASCII members."""
    letter = {"N": "N", "L": "L", "P": "P", "M": "M", "S": "S", "Lu": "L", "Ll": "L", "Lt": "L", "Lm": "L",
              "Lo": "L"}[name]
    ascii_members = {"N": "0-9", "L": "A-Za-z", "P": r"!-#%-*,-/:-;?-@\[-\]_\{\}", "M": "",
                     "S": r"\$\+<->^`\|\~"}[letter]
    return chr(COLLAPSED[letter]) + ascii_members


_UCAT = re.compile(r"\\p\{(N|L|P|M|S|Lu|Ll|Lt|Lm|Lo)\}")


def _collapsed_regex(regex: str) -> str:
    """llama.cpp's rewrite of a category regex for the collapsed text (same bracket tracking, same sets)."""
    out, inside, i = [], False, 0
    while i < len(regex):
        c = regex[i]
        if c == "[" and (i == 0 or regex[i - 1] != "\\"):
            inside = True
        elif c == "]" and inside and regex[i - 1] != "\\":
            inside = False
        m = _UCAT.match(regex, i)
        if m:
            members = _ucat_class(m.group(1))
            out.append(members if inside else f"[{members}]")
            i = m.end()
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _python_regex(regex: str) -> str:
    """ECMAScript -> Python `re`: $ outside a class is the end of the piece only."""
    out, inside, escaped = [], False, False
    for c in regex:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == "[":
            inside = True
        elif c == "]":
            inside = False
        elif c == "$" and not inside:
            c = r"\Z"
        out.append(c)
    return "".join(out)


def _regex_step(regex: str) -> Callable[..., list[tuple[int, int]]]:
    collapsed = bool(_UCAT.search(regex))
    pattern = re.compile(_python_regex(_collapsed_regex(regex) if collapsed else regex), re.ASCII)
    view_name = "collapsed" if collapsed else "plain"

    def step(text: str, views: dict[str, str], a: int, b: int) -> list[tuple[int, int]]:
        view = views.get(view_name)
        if view is None:
            view = views[view_name] = collapse(text) if collapsed else ascii_whitespace(text)
        spans, at = [], a
        for m in pattern.finditer(view[a:b]):
            start, end = a + m.start(), a + m.end()
            if start > at:
                spans.append((at, start))
            spans.append((start, end))
            at = end
        if at < b:
            spans.append((at, b))
        return spans

    return step


def _kimi_k2_step(text: str, views: dict[str, str], a: int, b: int) -> list[tuple[int, int]]:
    """Kimi-K2's pre-tokenizer as llama.cpp hand-codes it (unicode_regex_split_custom_kimi_k2): Han runs, letter
    runs without Han with an optional leading symbol and contraction, numbers by three, the rest GPT-4o-like."""

    def cpt(p: int) -> str:
        return text[p] if a <= p < b else ""

    def letter(p: int) -> bool:
        return a <= p < b and is_letter(text[p]) and not _is_han(text[p])

    def number(p: int) -> bool:
        return a <= p < b and is_number(text[p])

    def space(p: int) -> bool:
        return a <= p < b and is_whitespace(text[p])

    spans, prev, pos = [], a, a

    def emit(end: int) -> None:
        nonlocal prev
        if end > prev:
            spans.append((prev, end))
        prev = end

    while pos < b:
        c = text[pos]
        if _is_han(c):
            while a <= pos < b and _is_han(text[pos]):
                pos += 1
            emit(pos)
            continue
        lead_ok = not (c in "\r\n" or is_letter(c) or is_number(c))
        if letter(pos) or (lead_ok and letter(pos + 1)):
            if lead_ok:
                pos += 1
            while letter(pos):
                pos += 1
            if cpt(pos) == "'" and pos + 1 < b:
                n1 = cpt(pos + 1).lower() if cpt(pos + 1).isascii() else ""
                n2 = cpt(pos + 2).lower() if pos + 2 < b and cpt(pos + 2).isascii() else ""
                if n1 in ("s", "t", "m", "d"):
                    pos += 2
                elif n1 + n2 in ("re", "ve", "ll"):
                    pos += 3
            emit(pos)
            continue
        if is_number(c):
            start = pos
            while number(pos):
                pos += 1
                if pos - start >= 3:
                    emit(pos)
                    start = pos
            emit(pos)
            continue
        at = pos + 1 if c == " " else pos
        if a <= at < b and not (space(at) or is_letter(text[at]) or number(at)):
            pos = at
            while a <= pos < b and not (space(pos) or is_letter(text[pos]) or number(pos)):
                pos += 1
            while cpt(pos) in ("\r", "\n"):
                pos += 1
            emit(pos)
            continue
        n, last_newline = 0, 0
        while space(pos + n):
            if text[pos + n] in "\r\n":
                last_newline = pos + n + 1
            n += 1
        if last_newline:
            pos = last_newline
        elif n > 1 and pos + n < b:
            pos += n - 1
        elif n:
            pos += n
        else:
            pos += 1
        emit(pos)
    return spans


def _is_han(c: str) -> bool:
    o = ord(c)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2A6DF or 0x2A700 <= o <= 0x2B73F
            or 0x2B740 <= o <= 0x2B81F or 0x2B820 <= o <= 0x2CEAF or 0x2CEB0 <= o <= 0x2EBEF
            or 0xF900 <= o <= 0xFAFF or 0x2F800 <= o <= 0x2FA1F)


def _digit_groups_step(text: str, views: dict[str, str], a: int, b: int) -> list[tuple[int, int]]:
    """llama.cpp's unicode_regex_split_custom_afmoe: each run of numbers in groups of three from the right (the
    first group 1-2 long); whatever precedes a run stays attached to its first group."""
    spans, prev, pos = [], a, a
    while pos < b:
        if not is_number(text[pos]):
            pos += 1
            continue
        start = pos
        while pos < b and is_number(text[pos]):
            pos += 1
        cut = start + (pos - start) % 3
        if cut == start:
            cut += 3
        while cut <= pos:
            spans.append((prev, cut))
            prev, cut = cut, cut + 3
    if prev < b:
        spans.append((prev, b))
    return spans


_CUSTOM = {KIMI_K2: _kimi_k2_step, AFMOE_DIGITS: _digit_groups_step, DIGITS_BY_THREE: _digit_groups_step}


def _step(regex: str) -> Callable[..., list[tuple[int, int]]]:
    return _CUSTOM.get(regex) or _regex_step(regex)


def _rows(names: str, pre: PreTokenizer) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names.split(), pre)


_llama3 = PreTokenizer((LLAMA3,), ignore_merges=True, add_bos=True)
_starcoder = PreTokenizer((r"\p{N}", GPT2))
_gpt2 = PreTokenizer((GPT2,))
_qwen2 = PreTokenizer((QWEN2,))
_deepseek3 = PreTokenizer((r"\p{N}{1,3}", _CJK_KANA, DEEPSEEK3))
_bloom = PreTokenizer((BLOOM,))
_gpt4o = PreTokenizer((GPT4O,))
_tiny_aya = PreTokenizer((DIGITS_BY_THREE, O200K))
_chatglm = PreTokenizer((LLAMA3,))
_bailing = PreTokenizer((r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",))
_spm_style = PreTokenizer((NEWLINES,), byte_level=False, escape_spaces=True)

# tokenizer.ggml.pre -> how llama.cpp pre-tokenizes (llama-vocab.cpp of the llama.cpp that llama-cpp-python 0.3.36
# vendors); the names on one line share one behaviour
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # llama.cpp's fall-back for byte-level BPE vocabularies that name no pre-tokenizer
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    **_rows("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", _llama3),
    **_rows("dbrx smaug-bpe chatglm-bpe", _chatglm),
    **_rows("glm4 glm5", PreTokenizer((LLAMA3,), ignore_merges=True)),
    "jais-2": PreTokenizer((JAIS2,)),
    "deepseek-llm": PreTokenizer((r"[\r\n]", _DEEPSEEK_LATIN_GREEK, _DEEPSEEK_PUNCT, r"\s+$", _CJK_HANGUL, r"\p{N}+")),
    "deepseek-coder": PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")),
    **_rows("deepseek-v3 hunyuan-dense hy_v4 joyai-llm", _deepseek3),
    "spark2_5": PreTokenizer((r"\p{N}{1,3}", _CJK_KANA,
                              _ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]"
                              r"|\s+(?!\S)|\s+", r"\p{N}")),
    "youtu": PreTokenizer((_YOUTU_CJK, YOUTU), ignore_merges=True),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]")),
    **_rows("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2", _starcoder),
    **_rows("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jina-v1-en "
            "jina-v2-code roberta-bpe exaone4 mpt olmo jais trillion granite-docling", _gpt2),
    **_rows("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2", _qwen2),
    "qwen35": PreTokenizer((QWEN35,)),
    **_rows("poro-chat bloom gpt3-finnish", _bloom),
    "viking": PreTokenizer((BLOOM, r"\p{N}")),
    "tekken": PreTokenizer((TEKKEN,), ignore_merges=True, add_bos=True),
    "chameleon": PreTokenizer(("<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )",
                               r"\p{N}", r"[\p{P}!-/:-@\[-`{-~]", GPT2), add_bos=True),
    **_rows("gpt-4o llama4 kanana2 talkie minimax-m2", _gpt4o),
    "granite-embed-multi-97m": PreTokenizer((GRANITE_MULTI,), ignore_merges=True),
    **_rows("tiny_aya cohere2moe", _tiny_aya),
    "kimi-k2": PreTokenizer((KIMI_K2,)),
    "superbpe": PreTokenizer((r"\p{N}+", r"(?=(\d{3})+(?!\d))")),
    **_rows("bailingmoe bailingmoe2 llada-moe", _bailing),
    "seed-coder": PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                                r"|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    "ufakzeka": PreTokenizer((r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    "afmoe": PreTokenizer((AFMOE_DIGITS, _AFMOE_ASIAN, DEEPSEEK3)),
    "laguna": PreTokenizer((NEWLINES, QWEN2)),
    "exaone-moe": PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                                r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",)),
    **_rows("gemma4 granite-embed-multi-311m sarvam-moe", _spm_style),
    "minicpm5": PreTokenizer((r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), ignore_merges=True),
    "whitespace": PreTokenizer((r"\S+",), byte_level=False),
}
