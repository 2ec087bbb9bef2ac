"""A shop's warehouse in DuckDB SQL: customers, their events and orders, at any size.

Shared by the client CPU and first sync memory benchmarks, so both measure rows shaped like a
real shop's: distinct emails, names from small pools, E.164 phones on a share of customers (a
few in national format, read with the row's country code), Decimal money, timestamps, NULLs,
and a few invalid emails and phones that must be rejected. Everything derives from the row
number, so every run (and every implementation compared) sees the same rows.
"""

from __future__ import annotations

FIRST = "Olivia Liam Emma Noah Amelia Oliver Ava Elijah Sophia Mateo Isabella Lucas Mia Levi "
FIRST += "Charlotte Asher Luna James Harper Leo Evelyn Ezra Gianna Luca Aurora Hudson Ella Ethan"
LAST = "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez "
LAST += "Lopez Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson"
CITIES = "New York,Los Angeles,Chicago,Houston,Phoenix,Seattle,Denver,Boston,Austin,Miami"
DOMAINS = "gmail.com,yahoo.com,outlook.com,icloud.com,hotmail.com,example.org,shop.co.uk"
US_AREAS = "212,213,305,312,404,415,512,617,646,702,917,206"
CATEGORIES = "shoes,outerwear,accessories,denim,knitwear,bags"
METRICS = "Viewed Product,Added to Cart,Started Checkout,Active on Site"


def _pick(items: str, h: str, sep: str = ",") -> str:
    """SQL picking one of `items` by the non-negative integer expression `h`."""
    values = items.split(sep) if sep else items.split()
    listed = ", ".join("'" + value.replace("'", "''") + "'" for value in values)
    return f"[{listed}][1 + ({h}) % {len(values)}]"


def _phone(c: str, h: str) -> str:
    """A phone for customer number `c`: E.164 (US 75%, GB 15%, DE 10%), 10% of US ones in
    national format, and 0.5% invalid. Distinct per customer up to 8M customers."""
    digits = f"(({c}) * 7919 % 8000000)"
    us = f"{_pick(US_AREAS, f'{h} // 7')} || CAST(2000000 + {digits} AS VARCHAR)"
    return f"""CASE
        WHEN {h} % 200 = 0 THEN '+1555' || CAST({c} % 1000 AS VARCHAR)
        WHEN {h} % 100 < 75 AND {h} % 10 = 1 THEN
            '(' || substr({us}, 1, 3) || ') ' || substr({us}, 4, 3) || '-' || substr({us}, 7)
        WHEN {h} % 100 < 75 THEN '+1' || {us}
        WHEN {h} % 100 < 90 THEN '+4477' || CAST(10000000 + {digits} * 7 % 70000000 AS VARCHAR)
        ELSE '+49151' || lpad(CAST({digits} * 11 % 100000000 AS VARCHAR), 8, '0')
    END"""


def _country(h: str) -> str:
    return f"CASE WHEN {h} % 100 < 75 THEN 'US' WHEN {h} % 100 < 90 THEN 'GB' ELSE 'DE' END"


def _email(c: str, h: str) -> str:
    """Distinct per customer; 0.5% invalid (no @)."""
    name = f"lower({_pick(FIRST, h, '')}) || '.' || lower({_pick(LAST, f'{h} // 31', '')})"
    at = f"CASE WHEN {h} % 200 = 7 THEN '.at.' ELSE '@' END"
    return f"{name} || CAST({c} AS VARCHAR) || {at} || {_pick(DOMAINS, f'{h} // 37')}"


def _hashed(rows: int) -> str:
    """Row numbers 1..rows with a non-negative pseudo-random integer h per row."""
    return f"SELECT i, CAST(hash(i) >> 2 AS BIGINT) AS h FROM range(1, {rows} + 1) AS t(i)"


def customers_sql(rows: int, phone_percent: int = 40) -> str:
    """Profiles: one row per customer, `phone_percent`% of them with a phone."""
    return f"""
    SELECT
        i AS id,
        {_email("i", "h")} AS email,
        {_pick(FIRST, "h // 3", "")} AS first_name,
        {_pick(LAST, "h // 5", "")} AS last_name,
        CASE WHEN h // 11 % 100 < {phone_percent} THEN {_phone("i", "h // 13")} END AS phone,
        {_country("h // 13")} AS country_code,
        {_pick(CITIES, "h // 17")} AS city,
        lpad(CAST(h // 19 % 100000 AS VARCHAR), 5, '0') AS zip,
        CAST(h // 23 % 500000 / 100 AS DECIMAL(12, 2)) AS lifetime_value,
        CAST(h // 29 % 40 AS INTEGER) AS orders_count,
        TIMESTAMP '2019-01-01' + to_seconds(h // 41 % 180000000) AS signed_up_at,
        CASE WHEN h // 43 % 4 = 0 THEN NULL
             ELSE TIMESTAMP '2024-01-01' + to_seconds(h // 47 % 50000000) END AS last_order_at,
        CASE WHEN h // 53 % 2 = 0 THEN NULL
             ELSE {_pick("bronze,silver,gold,platinum", "h // 59")} END AS loyalty_tier,
        h // 61 % 3 > 0 AS accepts_marketing,
        {_pick(CATEGORIES, "h // 67")} AS favorite_category
    FROM ({_hashed(rows)})
    """


def events_sql(rows: int, events_per_customer: int = 20, phone_percent: int = 40) -> str:
    """Events of `rows // events_per_customer` customers, so identifiers repeat as in real life."""
    customers = max(1, rows // events_per_customer)
    return f"""
    SELECT
        i AS id,
        'evt_' || CAST(i AS VARCHAR) AS event_id,
        c AS customer_id,
        {_email("c", "ch")} AS email,
        CASE WHEN ch // 11 % 100 < {phone_percent} THEN {_phone("c", "ch // 13")} END AS phone,
        {_country("ch // 13")} AS country_code,
        {_pick(METRICS, "h // 3")} AS metric_name,
        TIMESTAMP '2025-01-01' + to_seconds(h // 5 % 25000000) AS occurred_at,
        CAST(h // 7 % 30000 / 100 AS DECIMAL(10, 2)) AS value,
        'SKU-' || CAST(h // 11 % 5000 AS VARCHAR) AS product_id,
        {_pick(CATEGORIES, "h // 13")} AS category,
        CAST(1 + h // 17 % 3 AS INTEGER) AS quantity,
        'https://shop.example.com/p/' || CAST(h // 11 % 5000 AS VARCHAR) AS url
    FROM (SELECT *, CAST(hash(c) >> 2 AS BIGINT) AS ch
          FROM (SELECT *, 1 + h % {customers} AS c FROM ({_hashed(rows)})))
    """


def orders_sql(rows: int, orders_per_customer: int = 4, phone_percent: int = 40) -> str:
    """Orders with 1 to 4 products each, as a JSON array column."""
    customers = max(1, rows // orders_per_customer)
    product = (
        "{{'sku': 'SKU-' || CAST((h // {k}) % 5000 AS VARCHAR), "
        f"'category': {_pick(CATEGORIES, 'h // {k}')}, "
        "'price': CAST((h // {k}) % 20000 AS DECIMAL(10, 2)) / 100, "
        "'quantity': CAST(1 + (h // {k}) % 2 AS INTEGER)}}"
    )
    products = ", ".join(product.format(k=k) for k in (101, 103, 107, 109))
    return f"""
    SELECT
        i AS id,
        c AS customer_id,
        {_email("c", "ch")} AS email,
        CASE WHEN ch // 11 % 100 < {phone_percent} THEN {_phone("c", "ch // 13")} END AS phone,
        {_country("ch // 13")} AS country_code,
        TIMESTAMP '2025-01-01' + to_seconds(h // 5 % 25000000) AS ordered_at,
        CAST(h // 7 % 60000 / 100 AS DECIMAL(10, 2)) AS total,
        'USD' AS currency,
        CAST(to_json(list_slice([{products}], 1, 1 + h // 3 % 4)) AS VARCHAR) AS products,
        CAST(h // 13 % 3 AS INTEGER) AS discount_codes
    FROM (SELECT *, CAST(hash(c) >> 2 AS BIGINT) AS ch
          FROM (SELECT *, 1 + h % {customers} AS c FROM ({_hashed(rows)})))
    """


PROFILE_MAPPING = {
    "email": "email",
    "phone_number": "phone",
    "external_id": "id",
    "first_name": "first_name",
    "last_name": "last_name",
    "location": {"city": "city", "zip": "zip", "country": "country_code"},
    "properties": {
        name: name
        for name in (
            "lifetime_value",
            "orders_count",
            "signed_up_at",
            "last_order_at",
            "loyalty_tier",
            "accepts_marketing",
            "favorite_category",
        )
    },
}
EVENT_MAPPING = {
    "email": "email",
    "phone_number": "phone",
    "external_id": "customer_id",
    "metric_name": "metric_name",
    "time": "occurred_at",
    "value": "value",
    "unique_id": "event_id",
    "properties": {name: name for name in ("product_id", "category", "quantity", "url")},
}
ORDER_MAPPING = {
    "email": "email",
    "phone_number": "phone",
    "external_id": "customer_id",
    "time": "ordered_at",
    "value": "total",
    "value_currency": "currency",
    "products": "products",
    "properties": {"discount_codes": "discount_codes"},
}
