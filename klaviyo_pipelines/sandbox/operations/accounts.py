"""``GET /api/accounts``: the one fake account behind the sandbox's API key (a health check)."""

from __future__ import annotations

from klaviyo_pipelines.sandbox.messages import ApiResponse
from klaviyo_pipelines.sandbox.operations.common import Ctx

ACCOUNT_ID = "SbXAcc"


def get_accounts(ctx: Ctx) -> ApiResponse:
    url = f"{ctx.base_url}/api/accounts/{ACCOUNT_ID}/"
    account = {
        "type": "account",
        "id": ACCOUNT_ID,
        "attributes": {
            "test_account": True,
            "contact_information": {
                "default_sender_name": "Klaviyo Sandbox",
                "default_sender_email": "sandbox@example.com",
                "website_url": "https://example.com",
                "organization_name": "Klaviyo Sandbox",
                "street_address": {
                    "address1": "1 Example Street",
                    "address2": None,
                    "city": "Boston",
                    "region": "MA",
                    "country": "US",
                    "zip": "02108",
                },
            },
            "industry": "Software / SaaS",
            "timezone": "UTC",
            "preferred_currency": "USD",
            "public_api_key": ACCOUNT_ID,
            "locale": "en-US",
        },
        "links": {"self": url},
    }
    links = {"self": f"{ctx.base_url}/api/accounts", "next": None, "prev": None}
    return ApiResponse(200, {"data": [account], "links": links})


HANDLERS = {"get_accounts": get_accounts}
