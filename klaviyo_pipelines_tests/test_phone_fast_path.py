"""The phone fast path gives libphonenumber's verdicts, exactly.

`normalise_phone` reads plain numbers without `phonenumbers.parse` (actions/phone.py). Here
its verdicts (the E.164 value, or the InvalidRow's field and reason) are compared with plain
phonenumbers on a large generated sample: the bench's shop phones (bench/shop_data.py), every
region's example numbers mutated and written every way, random digits after every calling
code, and malformed text, each read with and without a country.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterator
from pathlib import Path

import duckdb
import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberFormat
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

from klaviyo_pipelines.actions.phone import Fast, fast_e164
from klaviyo_pipelines.actions.profile import InvalidRow, normalise_phone

REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)
CALLING_CODES = sorted(COUNTRY_CODE_TO_REGION_CODE)
SHOP_ROWS = 40_000
SAMPLE_SIZE = 200_000


def shop_data():  # type: ignore[no-untyped-def]
    """bench/shop_data.py, the rows the client CPU benchmark times."""
    path = Path(__file__).resolve().parent.parent / "bench" / "shop_data.py"
    spec = importlib.util.spec_from_file_location("shop_data", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(value: str, country: str | None) -> tuple[str, str | None, str]:
    """normalise_phone's outcome as plain phonenumbers gives it: ('ok', None, E.164) or
    ('invalid', field, reason), the reason worded as normalise_phone words it."""
    text = str(value).strip()
    plus = text.startswith("+")
    try:
        parsed = phonenumbers.parse(text, None if plus else country)
        valid = phonenumbers.is_valid_number(parsed)
    except phonenumbers.NumberParseException:
        valid = False
    if valid:
        return "ok", None, phonenumbers.format_number(parsed, PhoneNumberFormat.E164)
    hint = "" if plus or country else " (no country_code to read it with)"
    return "invalid", "phone_number", f"{text!r} cannot be converted to E.164{hint}"


def outcome(value: str, country: str | None) -> tuple[str, str | None, str]:
    try:
        return "ok", None, normalise_phone(value, country)
    except InvalidRow as exc:
        return "invalid", exc.field, exc.reason


def shop_phones() -> list[tuple[str, str]]:
    """Every phone of the benchmark's customers, with the row's country code."""
    sql = shop_data().customers_sql(SHOP_ROWS, phone_percent=100)
    with duckdb.connect() as con:
        return con.execute(f"SELECT phone, country_code FROM ({sql}) ORDER BY id").fetchall()


def written(rng: random.Random, number: phonenumbers.PhoneNumber) -> Iterator[str]:
    """One number in the ways a warehouse holds it."""
    nsn = phonenumbers.national_significant_number(number)
    code = str(number.country_code)
    yield phonenumbers.format_number(number, PhoneNumberFormat.E164)
    yield phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)
    yield phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
    yield nsn
    yield code + nsn  # the calling code without '+'
    yield "00" + code + nsn  # an IDD
    yield "011" + code + nsn
    yield "0" + nsn  # a national prefix
    yield "1" + nsn
    yield "+" + code + "0" + nsn
    yield "+" + code + "1" + nsn
    spaced = "".join(d + rng.choice(["", "", " ", "-", ".", "(", ")"]) for d in nsn)
    yield rng.choice(["", "+" + code + " ", "(", " "]) + spaced


def mutated(rng: random.Random, digits: str) -> str:
    """The digits with a random tail, one digit more or less at times."""
    keep = rng.randint(0, len(digits))
    size = max(0, len(digits) - keep + rng.choice([-1, 0, 0, 0, 1]))
    return digits[:keep] + "".join(rng.choice("0123456789") for _ in range(size))


def malformed(rng: random.Random) -> str:
    # with a fullwidth plus, an Arabic-Indic and a fullwidth digit
    alphabet = "0123456789+ ()-.x#;,/*~ext=tel:ABC\t\uff0b\u0663\uff10"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))


def countries(rng: random.Random, region: str | None) -> list[str | None]:
    """The row's own region, none, another region, and one phonenumbers does not know."""
    return [region, None, rng.choice(REGIONS), rng.choice(["XX", "USA", "us", "001"])]


def generated_sample() -> list[tuple[str, str | None]]:
    rng = random.Random(15)
    sample: list[tuple[str, str | None]] = []
    for phone, country in shop_phones():
        sample += [(phone, country), (phone, None)]
    for region in REGIONS:
        for kind in range(12):  # every PhoneNumberType
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            nsn = phonenumbers.national_significant_number(example)
            for _ in range(6):
                digits = mutated(rng, nsn)
                number = phonenumbers.PhoneNumber(
                    country_code=example.country_code, national_number=int(digits or "0")
                )
                for text in written(rng, number):
                    sample.append((text, rng.choice(countries(rng, region))))
    while len(sample) < SAMPLE_SIZE:
        code = rng.choice(CALLING_CODES)
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 18)))
        sample.append((f"+{code}{digits}", None))
        sample.append((digits, rng.choice(countries(rng, rng.choice(REGIONS)))))
        sample.append((malformed(rng), rng.choice(countries(rng, "US"))))
    return sample


@pytest.fixture(scope="module")
def sample() -> list[tuple[str, str | None]]:
    return generated_sample()


def test_the_verdicts_are_phonenumbers_own_on_a_large_sample(sample) -> None:
    assert len(sample) >= SAMPLE_SIZE
    differ = [
        (value, country, got, want)
        for value, country in sample
        if (got := outcome(value, country)) != (want := reference(value, country))
    ]
    assert differ == [], f"{len(differ)} verdicts differ, e.g. {differ[:5]}"
    # The comparison is not vacuous: the fast path answered most of them, both ways.
    plus = [(v, None if v.startswith("+") else c) for v, c in sample]
    answers = [fast_e164(value.strip(), country) for value, country in plus]
    decided = [answer for answer in answers if answer is not Fast.DEFER]
    assert len(decided) > len(sample) // 2
    assert sum(answer is None for answer in decided) > 10_000
    assert sum(isinstance(answer, str) for answer in decided) > 10_000
    regions = {phonenumbers.region_code_for_number(phonenumbers.parse(a)) for a in decided if a}
    assert len(regions) > 200


def test_the_fast_path_reads_every_shop_phone() -> None:
    """The benchmark's numbers (E.164, and national ones with their country) never reach
    phonenumbers: each is answered by the fast path, and as phonenumbers answers it."""
    phones = shop_phones()
    assert {country for _, country in phones} == {"US", "GB", "DE"}
    for phone, country in phones:
        for reading in [None] if phone.startswith("+") else [country, None]:
            fast = fast_e164(phone, reading)
            kind, _, e164 = reference(phone, reading)
            assert fast == (e164 if kind == "ok" else None), (phone, reading)


plain_text = st.builds(
    lambda plus, code, body: (f"+{code}" if plus else "") + body,
    st.booleans(),
    st.sampled_from(CALLING_CODES),
    st.text(alphabet="0123456789 ().-", max_size=20),
)


@settings(max_examples=3_000, deadline=None)
@given(
    st.one_of(plain_text, st.text(alphabet="0123456789+ ().-x#", max_size=22), st.text()),
    st.one_of(
        st.none(), st.sampled_from(["US", "GB", "DE", "CA", "IT", "XX"]), st.sampled_from(REGIONS)
    ),
)
def test_the_verdicts_are_phonenumbers_own_for_any_text(value: str, country: str | None) -> None:
    assert outcome(value, country) == reference(value, country)
