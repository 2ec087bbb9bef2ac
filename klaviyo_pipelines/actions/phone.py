"""Phone numbers in E.164, with libphonenumber's verdicts at a tenth of its cost.

`phonenumbers.parse` + `is_valid_number` cost ~20 µs a number, mostly generic work that a
number written as digits and the usual separators does not need: the RFC 3966, extension
and vanity-number patterns, and a regex compiled per metadata pattern per call. For such a
number the fast path does what `parse` would do, step by step, then checks validity against
libphonenumber's own metadata, compiled once per region and length. Every input that would
take another branch of `parse` (letters, an extension, an IDD, a national prefix, a country
code typed without '+') goes to phonenumbers itself. test_phone_fast_path.py compares the
two on every region.
"""

from __future__ import annotations

import enum
import re
from functools import lru_cache
from typing import Literal, NamedTuple

import phonenumbers
from phonenumbers import PhoneMetadata, PhoneNumberDesc
from phonenumbers.phonenumberutil import (
    COUNTRY_CODE_TO_REGION_CODE,
    REGION_CODE_FOR_NON_GEO_ENTITY,
    country_code_for_valid_region,
    region_code_for_country_code,
)

# Numbers phonenumbers read, remembered by raw text and country (15 to 20 MB at most): they
# cost ~20 µs each, and warehouses repeat numbers (all of a customer's events carry theirs).
# The fast path's own verdicts are not: at ~1.5 µs they cost less than a cache miss and the
# garbage collector's walks over the cache's entries.
CACHE_SIZE = 65_536

# Digits and the separators `parse` drops, a '+' only first; no letter, so no extension, RFC
# 3966 parameter or vanity number. Any other text is phonenumbers' to read.
_PLAIN = re.compile(r"\+?[0-9 ().\-]{4,64}", re.ASCII)
_SEPARATORS = b"+ ().-"
_MIN_DIGITS, _MAX_DIGITS = 4, 20  # beyond these, leave the edge cases to phonenumbers
_MIN_NSN, _MAX_NSN = 2, 17  # phonenumbers' bounds on a national significant number


def _code_of(prefix: str) -> tuple[int, int] | None:
    """The calling code a number's first digits start with, and its length: the shortest
    known one, as in `_extract_country_code`."""
    for size in (1, 2, 3):
        if int(prefix[:size]) in COUNTRY_CODE_TO_REGION_CODE:
            return int(prefix[:size]), size
    return None


_CODE_OF_PREFIX = {f"{n:03d}": _code_of(f"{n:03d}") for n in range(100, 1000)}  # none starts 0


class Fast(enum.Enum):
    """The fast path's answer when it does not read a number exactly as `parse` would."""

    DEFER = "ask phonenumbers"


def e164(text: str, country: str | None) -> str | None:
    """The number in E.164, None if it is not a valid one; `country` reads a national number."""
    fast = fast_e164(text, country)
    return _e164_remembered(text, country) if fast is Fast.DEFER else fast


def e164_by_phonenumbers(text: str, country: str | None) -> str | None:
    """libphonenumber's own verdict: the reference the fast path must equal."""
    try:
        parsed = phonenumbers.parse(text, country)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


_e164_remembered = lru_cache(maxsize=CACHE_SIZE)(e164_by_phonenumbers)


def fast_e164(text: str, country: str | None) -> str | Literal[Fast.DEFER] | None:
    """`e164` for plain input, `Fast.DEFER` for any other. Mirrors `parse`: for this input the
    possible number is the text, it is viable (3+ digits) and has no extension."""
    if text[:1] == "+" and text.isascii() and text[1:].isdigit():  # E.164 already, mostly
        digits = text[1:]
    elif _PLAIN.fullmatch(text) is not None:
        digits = text.encode().translate(None, _SEPARATORS).decode()
    else:
        return Fast.DEFER
    if not _MIN_DIGITS <= len(digits) <= _MAX_DIGITS:
        return Fast.DEFER
    if text[0] == "+":  # country ignored: `parse` reads the calling code after the '+'
        found = _CODE_OF_PREFIX.get(digits[:3])
        if found is None:
            return None  # no known calling code after the '+'
        code, size = found
        calling = _LOADED.get(code) or _load(code)
        national_prefix = calling.national_prefix  # of the code's main region
        nsn = digits[size:]
    else:
        reading = _READINGS.get(country) if country is not None else None
        if reading is None:
            if country not in phonenumbers.SUPPORTED_REGIONS:
                return None  # no '+' and no region to read it with: `parse` refuses it
            reading = _READINGS[country] = _Reading.of(country)
        calling, national_prefix = reading.calling, reading.national_prefix
        if reading.idd.match(digits) or digits.startswith(calling.text):
            return Fast.DEFER  # `parse` would look for a calling code after an IDD or in front
        nsn = digits
    if len(nsn) < _MIN_NSN:
        return None
    if national_prefix is not None and national_prefix.match(nsn):
        return Fast.DEFER  # whether `parse` strips it depends on lengths: phonenumbers' call
    if len(nsn) > _MAX_NSN:
        return None
    return f"+{calling.text}{nsn}" if calling.valid(nsn) else None


class _Region(NamedTuple):
    """One region of a calling code, in the order `region_code_for_number` tries them."""

    leading_digits: re.Pattern[str] | None  # None: the region is tried by its number types
    types: _NumberTypes | None  # None: phonenumbers has no metadata for it
    same_code: bool  # `is_valid_number_for_region`'s check that the code is the region's


class _CallingCode:
    """What a calling code's regions need to judge a number: the code's main region's national
    prefix (which `parse` strips after '+code'), and its regions' number types."""

    def __init__(self, code: int) -> None:
        self.text = str(code)
        main = PhoneMetadata.metadata_for_region_or_calling_code(
            code, region_code_for_country_code(code)
        )
        self.national_prefix = _national_prefix(main)
        names = COUNTRY_CODE_TO_REGION_CODE[code]
        regions = []
        for name in names:
            if len(names) == 1:  # `region_code_for_number` takes it, and no leading digits
                metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, name)
                leading = None
            else:  # `_region_code_for_number_from_list` tries each
                metadata = PhoneMetadata.metadata_for_region(name, None)
                leading = metadata.leading_digits if metadata is not None else None
            same_code = name == REGION_CODE_FOR_NON_GEO_ENTITY or (
                country_code_for_valid_region(name) == code
            )
            regions.append(
                _Region(
                    re.compile(leading) if leading else None,
                    _NumberTypes(metadata) if metadata is not None else None,
                    same_code,
                )
            )
        self.regions = tuple(regions)

    def valid(self, nsn: str) -> bool:
        """`phonenumbers.is_valid_number` of +code nsn: the number's region is the first whose
        leading digits it starts with or, for a region without, whose types it matches; then
        the number must match that region's types."""
        for leading, types, same_code in self.regions:
            if types is None:
                continue
            if leading is None:
                if types.match(nsn):
                    return same_code
            elif leading.match(nsn):
                return same_code and types.match(nsn)
        return False


_LOADED: dict[int, _CallingCode] = {}


def _load(code: int) -> _CallingCode:
    found = _LOADED[code] = _CallingCode(code)
    return found


class _Reading(NamedTuple):
    """What `parse` needs to read a national number with a region: its IDD and national
    prefix, and its calling code."""

    calling: _CallingCode
    idd: re.Pattern[str]
    national_prefix: re.Pattern[str] | None

    @classmethod
    def of(cls, region: str) -> _Reading:
        metadata = PhoneMetadata.metadata_for_region(region, None)
        calling = _LOADED.get(metadata.country_code) or _load(metadata.country_code)
        idd = re.compile(metadata.international_prefix or "NonMatch")  # `parse`'s default
        return cls(calling, idd, _national_prefix(metadata))


_READINGS: dict[str, _Reading] = {}


def _national_prefix(metadata: PhoneMetadata) -> re.Pattern[str] | None:
    pattern = metadata.national_prefix_for_parsing
    return re.compile(pattern) if pattern else None


class _NumberTypes:
    """A region's valid numbers: `_number_type_helper` is not UNKNOWN, i.e. the general
    description matches, and so does one of the types it tries (mobile only where its pattern
    differs from fixed line). Compiled per length, of the descriptions whose possible lengths
    include it, into one pattern: a lookahead for the general one, then any of the types."""

    def __init__(self, metadata: PhoneMetadata) -> None:
        self._metadata = metadata
        self._by_length: dict[int, re.Pattern[str] | None] = {}

    def match(self, nsn: str) -> bool:
        length = len(nsn)
        try:
            pattern = self._by_length[length]
        except KeyError:
            pattern = self._by_length[length] = self._compile(length)
        return pattern is not None and pattern.fullmatch(nsn) is not None

    def _compile(self, length: int) -> re.Pattern[str] | None:
        meta = self._metadata
        if not _describes(meta.general_desc, length):
            return None
        types = [
            meta.premium_rate,
            meta.toll_free,
            meta.shared_cost,
            meta.voip,
            meta.personal_number,
            meta.pager,
            meta.uan,
            meta.voicemail,
            meta.fixed_line,
        ]
        if not meta.same_mobile_and_fixed_line_pattern:
            types.append(meta.mobile)
        patterns = [desc.national_number_pattern for desc in types if _describes(desc, length)]
        if not patterns:
            return None
        general = f"(?=(?:{meta.general_desc.national_number_pattern})\\Z)"
        either = "|".join(f"(?:{pattern})" for pattern in patterns)
        return re.compile(f"{general}(?:{either})")


def _describes(desc: PhoneNumberDesc | None, length: int) -> bool:
    """`_is_number_matching_desc` before its pattern: a description with a pattern, whose
    possible lengths (none listed: any) include this one."""
    if desc is None or not desc.national_number_pattern:
        return False
    return not desc.possible_length or length in desc.possible_length
