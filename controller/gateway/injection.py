"""Prompt-injection and jailbreak scoring: patterns plus a weighted heuristic, behind a Protocol.

:class:`InjectionClassifier` is the plug-in point (a classifier model can replace the
heuristic); :class:`HeuristicClassifier` is the built-in one. It normalises the text (NFKC,
zero-width characters removed, common homoglyphs and leetspeak folded), decodes base64, hex
and rot13 blobs and scans them too, and combines the features that fire as a noisy-OR of their
weights: ``1 - prod(1 - w)``. Weights and :data:`THRESHOLD` were chosen on the tuning half of
``tests/fixtures/injection/prompts.jsonl`` only (see bench/injection.py).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from typing import Protocol

__all__ = ["FEATURES", "THRESHOLD", "HeuristicClassifier", "InjectionClassifier", "features"]


class InjectionClassifier(Protocol):
    """Scores text from 0 (benign) to 1 (certainly an injection)."""

    def score(self, text: str) -> float: ...


_I = re.IGNORECASE
_ANY = r"(?:all|any|every|the|your|my|these|those|previous|prior|above|earlier|preceding|" \
       r"original|initial|system|old|existing|current|developer)"
_RULES = r"(?:instructions?|rules?|guidelines?|directives?|directions?|prompts?|constraints?|" \
         r"restrictions?|polic(?:y|ies)|programming|guardrails?|safeguards?|commands?|context)"

# name -> (pattern, weight); the patterns see the folded text in lower case
FEATURES: dict[str, tuple[re.Pattern[str], float]] = {
    "override": (re.compile(
        r"\b(?:ignore|disregard|forget|skip|override|overrule|bypass|abandon|drop|discard|"
        r"set aside|throw out|do not follow|don't follow|stop following|no longer follow)\b"
        r"[^.\n]{0,40}?\b" + _ANY + r"\b[^.\n]{0,30}?\b" + _RULES + r"\b"), 0.9),
    "new_instructions": (re.compile(
        r"\b(?:new|updated|real|actual|true|revised) (?:instructions?|rules?|task|directive|"
        r"system prompt)\s*(?::|are|is)|\bfrom now on\b|\binstead,? (?:you )?(?:will|must|should)\b"
        r"|\byour (?:new|only|real) (?:task|goal|purpose|job) is\b"), 0.55),
    "role_play": (re.compile(
        r"\byou are (?:now|no longer)\b|\b(?:act|behave|respond|answer) as (?:if you (?:were|are)"
        r"|an? (?:unrestricted|unfiltered|uncensored|evil|jailbroken|rogue))|\bpretend (?:to be|"
        r"you(?:'re| are))|\broleplay as\b|\bstay in character\b|\bsimulate an? (?:unrestricted|"
        r"unfiltered|ai without)|\bpretend\b|\bbreak(?:s|ing)? character\b"), 0.45),
    "jailbreak_persona": (re.compile(
        r"\b(?:do anything now|jailbr(?:eak|oken)|god mode|opposite mode)\b"
        r"|\bevil (?:ai|assistant|twin|bot|confidant)\b"
        r"|\b(?:unfiltered|uncensored|unrestricted|amoral) (?:ai|mode|assistant|model|version|"
        r"response|chatbot)\b"), 0.75),
    "developer_mode": (re.compile(r"\bdev(?:eloper)? mode\b"), 0.35),
    "ai_persona": (re.compile(
        r"\b(?:you are|you're|act as|play the role of|role-?play(?: as)?|pretend|imagine)\b"
        r"[^.\n]{0,40}"
        r"\b(?:ai|assistant|model|chatbot|bot|version of yourself)s?\b"), 0.3),
    "no_limits": (re.compile(
        r"\b(?:no|without|free (?:of|from)|freed from|not bound by|zero|any) (?:ethical |moral |"
        r"content |safety )?(?:restrictions|limits|limitations|filters?|censorship|rules|"
        r"guidelines|boundaries|constraints)\b|\bbroken free\b|\bcan(?:not|'t) refuse\b|"
        r"\bnever refuses?\b|\bwithout (?:any )?(?:warnings?|disclaimers?)\b"), 0.45),
    "leak": (re.compile(
        r"\b(?:repeat|print|reveal|show|output|display|tell me|give me|share|dump|leak|recite|"
        r"write out|spell out|what (?:is|are|were|was)|list|copy|paste|translate|summari[sz]e|"
        r"convert|rewrite|turn)\b"
        r"[^.\n?]{0,30}?\b(?:your|the|its|any|all) (?:(?:full|exact|original|initial|hidden|"
        r"secret|internal|complete|entire|confidential|first) )*(?:system (?:prompt|message|"
        r"instructions?)|(?:initial|hidden|secret|original|developer|pre-?) ?"
        r"(?:prompt|instructions)|"
        r"instructions (?:you were given|above)|prompt (?:above|you were given)|"
        r"(?:hidden|secret|internal|confidential) (?:instructions?|rules|configuration))"),
        0.85),
    "leak_above": (re.compile(
        r"\b(?:everything|all text|the text|all the text|words|what(?:ever)? (?:is|was) written)"
        r" (?:above|before this|prior to this)\b|\bwritten (?:above|before (?:this|my))\b"
        r"|\b(?:starting|beginning) with (?:the phrase )?['\"]?you are\b"), 0.5),
    "copy_exact": (re.compile(
        r"\b(?:verbatim|word for word|copy it exactly|exactly as written)\b"), 0.3),
    "address_ai": (re.compile(
        r"\b(?:note|attention|message|instructions?|important|notice|hey|dear)(?: to| for)?,? "
        r"(?:the |any |all )?(?:ai|assistant|llm|language model|chatbot|bot|model|agent)s?\b"
        r"|\b(?:ai|assistant|llm|language model|chatbot|agent)s? (?:reading|processing|"
        r"summari[sz]ing|parsing|reviewing) this\b|\bif you are an? (?:ai|llm|language model|"
        r"assistant)\b|\bwhen (?:you |the (?:ai|assistant|model) )?(?:summari[sz]e|read|process)"
        r"(?:s|ing)? this\b"), 0.6),
    "fake_turn": (re.compile(
        r"(?:^|\n)[\s>]*(?:\[?(?:system|assistant|admin|developer)\]?\s*:|<\|?(?:system|im_start|"
        r"endoftext)\|?>|\[/?(?:inst|system)\]|###\s*(?:system|instruction))|<!--[^>]{0,200}"
        r"\b(?:ignore|assistant|ai|instruction)"), 0.5),
    "exfiltrate": (re.compile(
        r"!\[[^\]]*\]\(https?://[^)]*[?&][a-z]+=|\b(?:send|forward|email|post|upload|exfiltrate)"
        r"\b[^.\n]{0,40}?\b(?:conversation|chat history|user'?s? (?:data|password|emails?|"
        r"credentials)|api keys?|passwords?)\b[^.\n]{0,40}?\b(?:to|at)\b"), 0.5),
    "decode_and_follow": (re.compile(
        r"\b(?:decode|decrypt|translate|deobfuscate|reverse|rot13|base64|hex)\b[^.\n]{0,60}?\b"
        r"(?:follow|execute|obey|do what|carry out|act on|comply|perform)\b"), 0.5),
}
# Talk about attacks (a question about a phrase, a quoted character) rather than an attack.
_META = re.compile(
    r"\b(?:phrases? like|such as ['\"]|(?:the|this|a) paper|article|detect(?:ed|ion|s)?|"
    r"attackers? (?:use|try|can|could|might|often)|"
    r"defen[cs]es?|defend|zsh|bash|PS1|shell prompt|command prompt)\b"
    r"|\b(?:says|said|shouts|whispers|writes)\s*[,:]?\s*['\"\u201c]", _I)
_META_FACTOR = 0.5
# Jailbreak personas known by their upper-case names, matched before lowering.
_PERSONAS = re.compile(r"\b(?:DAN|STAN|DUDE|AIM)\b")
# And two features that features() sets: text that fired only once folded, a decoded blob that
# fired.
_OBFUSCATED_W = 0.25
_DECODED_W = 0.85
THRESHOLD = 0.5

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"), None)
_HOMOGLYPHS = str.maketrans(  # Cyrillic and Armenian letters that look Latin
    "\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0456\u0458\u0501\u0578\u0455"
    "\u0410\u0415\u041e\u0420\u0421\u0425\u0412\u041c\u041d\u0422\u041a\u0406\u0408",
    "aeopcyxijdnsAEOPCXBMHTKIJ")
_LEET = str.maketrans("013457@$|!", "oieastasli")
_LEET_WORD = re.compile(r"\b(?=[a-z]*[013457@$][a-z013457@$]*\b)[a-z013457@$]{3,}\b", _I)
_SPACED = re.compile(r"\b(?:[A-Za-z][ .\-_*]){4,}[A-Za-z]\b")
_B64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
_HEX = re.compile(r"\b(?:[0-9a-fA-F]{2}[ :]?){10,}\b")
_ROT13_HINT = re.compile(r"\b(?:rot-?13|caesar|rotate)\b", _I)


def _decoded(text: str) -> list[str]:
    """Text hidden in base64 or hex blobs, and the rot13 of the text when it asks for rot13."""
    found: list[str] = []
    for blob in _B64.findall(text):
        try:
            raw = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        found.append(raw.decode("utf-8", "ignore"))
    for blob in _HEX.findall(text):
        try:
            found.append(bytes.fromhex(re.sub(r"[ :]", "", blob)).decode("utf-8", "ignore"))
        except ValueError:
            continue
    if _ROT13_HINT.search(text):
        found.append(codecs.decode(text, "rot13"))
    return [d for d in found if sum(c.isalpha() or c == " " for c in d) > 0.8 * len(d) > 8]


def _unhide(text: str) -> str:
    """NFKC, zero-width characters dropped, look-alike letters made Latin."""
    if text.isascii():  # all three leave ASCII as it is (and most prompts are ASCII)
        return text
    return unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH).translate(_HOMOGLYPHS)


def normalise(text: str) -> tuple[str, bool]:
    """The text folded for matching, and whether folding changed anything."""
    folded = _SPACED.sub(lambda m: re.sub(r"[ .\-_*]", "", m.group()), _unhide(text))
    folded = _LEET_WORD.sub(lambda m: m.group().translate(_LEET), folded)
    return folded, folded != text


def _plain_features(text: str) -> set[str]:
    lowered = text.lower()
    fired = {name for name, (pattern, _) in FEATURES.items() if pattern.search(lowered)}
    if _PERSONAS.search(text):
        fired.add("jailbreak_persona")
    return fired


def features(text: str) -> set[str]:
    """The names of the features that fire on ``text``."""
    folded, changed = normalise(text)
    fired = _plain_features(folded)
    if changed and fired - _plain_features(text):
        fired.add("obfuscated")
    for hidden in _decoded(_unhide(text)):  # before leetspeak folding, which breaks base64
        if _plain_features(normalise(hidden)[0]):
            fired.add("decoded_injection")
            break
    return fired


_WEIGHT = {name: w for name, (_, w) in FEATURES.items()}
_WEIGHT["obfuscated"] = _OBFUSCATED_W
_WEIGHT["decoded_injection"] = _DECODED_W


class HeuristicClassifier:
    """The built-in scorer: ``1 - prod(1 - weight)`` over the features that fire, halved when
    the text talks about attacks (quotes a phrase, names a paper, a shell's prompt)."""

    def score(self, text: str) -> float:
        fired = features(text)
        if not fired:
            return 0.0
        keep = 1.0
        for name in fired:
            keep *= 1.0 - _WEIGHT[name]
        return (1.0 - keep) * (_META_FACTOR if _META.search(text) else 1.0)
