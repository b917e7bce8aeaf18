"""Output redaction: known secret formats, Luhn, and streams that give the same text as a whole."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_ops_helper.controller.gateway import redact as redact_module
from llm_ops_helper.controller.gateway.redact import StreamRedactor, luhn_ok, redact

PRIVATE_KEY = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\n"
               "aFDrBz9vFqU4yXz1c+Uq0Q7sTzM0rX5Vb2K9R1m1pZyGvD8w==\n-----END RSA PRIVATE KEY-----")
SECRETS = {
    "api_key": ["sk-proj-Abc123def456GHI789jkl012MNO345", "sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345",
                "AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2c3D4e5" * 4, "github_pat_11ABCDEFG0123456789abcdefgh",
                "xoxb-123456789012-abcdefghij", "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW",
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
                "llmops_" + "Ab3-_xYz9Q" * 4 + "k2F"],  # controller.auth.new_token's shape
    "private_key": [PRIVATE_KEY],
    "email": ["alice.smith+ops@example.co.uk", "bob@mail.example.com"],
    "phone": ["+1 415 555 2671", "+442079460958", "(415) 555-2671", "415-555-2671", "020 7946 0958"],
    "card": ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005", "6011111111111117"],
}
NOT_SECRETS = ["version 1.2.3", "port 8080", "the year 2024", "id 1234567890123",  # 13 digits, starts with 1
               "4111 1111 1111 1112",  # fails Luhn
               "sk-short", "order 5551234567", "2024-01-15", "10.0.0.1", "user@localhost",
               "ignore all previous", "-----BEGIN CERTIFICATE-----", "x" * 40, "price: 1,234,567.89"]


@pytest.mark.parametrize(("kind", "secret"), [(k, s) for k, v in SECRETS.items() for s in v])
def test_each_known_format_is_redacted_in_running_text(kind: str, secret: str) -> None:
    out, counts = redact(f"here it is: {secret}. thanks")
    assert out == f"here it is: [redacted:{kind}]. thanks"
    assert counts == {kind: 1}


@pytest.mark.parametrize("text", NOT_SECRETS)
def test_plain_numbers_and_words_are_left_alone(text: str) -> None:
    assert redact(f"see {text} here") == (f"see {text} here", {})


def test_bearer_tokens_keep_the_word_and_lose_the_token() -> None:
    out, _ = redact("Authorization: Bearer abc.DEF_123-xyz~token+/==")
    assert out == "Authorization: Bearer [redacted:api_key]"


def test_kinds_can_be_switched_off() -> None:
    out, counts = redact("mail bob@example.com, call +1 415 555 2671", kinds=("phone",))
    assert out == "mail bob@example.com, call [redacted:phone]"
    assert counts == {"phone": 1}


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_a_key_split_across_chunks_never_leaves_the_redactor() -> None:
    redactor = StreamRedactor()
    chunks = ["Your key is sk-proj-Abc123", "def456GHI789", "jkl012MNO345 and the mail is bo", "b@example.com", "."]
    sent = [redactor.feed(c) for c in chunks]
    assert "Abc123" not in "".join(sent)
    assert "".join(sent) + redactor.flush() == "Your key is [redacted:api_key] and the mail is [redacted:email]."
    assert redactor.redactions == {"api_key": 1, "email": 1}


def test_prose_streams_out_without_waiting_for_the_end() -> None:
    redactor = StreamRedactor()
    assert redactor.feed("Hello there, how are you today? ") == "Hello there, how are you today?"
    assert redactor.feed("Fine, thanks! ") == " Fine, thanks!"


def test_a_private_key_block_is_held_until_its_end_line() -> None:
    redactor = StreamRedactor()
    lines = PRIVATE_KEY.split("\n")
    sent = redactor.feed("key:\n")
    for line in lines:
        sent += redactor.feed(line + "\n")
        assert "MIIE" not in sent
    assert sent + redactor.flush() == "key:\n[redacted:private_key]\n"


FRAGMENTS = [s for v in SECRETS.values() for s in v] + NOT_SECRETS + [
    " ", "\n", ". ", ", ", "Bearer ", "call me at ", "email: ", "(", ")", "-", "+", "1", "42", "0",
    "some words", "-----BEGIN", "PRIVATE KEY-----", "@", "abc", "Bearer abcdefghijklmnopqrst"]


@st.composite
def text_and_splits(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = "".join(draw(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=5), max_size=25)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(text_and_splits())
def test_a_stream_gives_exactly_what_the_whole_text_gives_for_any_split(case: tuple[str, list[str]]) -> None:
    text, chunks = case
    redactor = StreamRedactor()
    streamed = "".join(redactor.feed(c) for c in chunks) + redactor.flush()
    whole, counts = redact(text)
    assert streamed == whole
    assert redactor.redactions == counts


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789 -+().ab@sk_xAKIZ\n", max_size=60), st.data())
def test_streams_of_digit_and_token_soup_match_too(text: str, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    redactor = StreamRedactor()
    streamed = "".join(redactor.feed(text[a:b]) for a, b in itertools.pairwise(bounds))
    assert streamed + redactor.flush() == redact(text)[0]


def _ungated(text: str) -> str:
    """The redaction _PATTERN alone gives, with no gate in front of it: the reference."""
    out, pos = [], 0
    for match in redact_module._PATTERN.finditer(text):
        kind, found = match.lastgroup, match.group()
        if (kind == "card" and not luhn_ok(found.replace(" ", "").replace("-", ""))) or (
                kind == "phone" and not 7 <= sum(c.isdigit() for c in found) <= 15):
            continue
        out += [text[pos:match.start()], f"[redacted:{kind}]"]
        pos = match.end()
    return "".join(out) + text[pos:]


@settings(max_examples=400, deadline=None)
@given(text_and_splits())
def test_the_cheap_gate_never_hides_a_secret(case: tuple[str, list[str]]) -> None:
    text, chunks = case
    assert redact(text)[0] == _ungated(text)
    redactor = StreamRedactor()  # and the stream, which gates each scan from where it resumes
    assert "".join(redactor.feed(c) for c in chunks) + redactor.flush() == _ungated(text)


@given(st.sampled_from([s for v in SECRETS.values() for s in v]), st.text(max_size=30),
       st.text(max_size=30))
def test_the_gate_lets_every_known_format_through_in_any_surroundings(
        secret: str, before: str, after: str) -> None:
    text = f"{before} {secret} {after}"
    assert redact(text)[0] == _ungated(text)
