"""The OpenAPI document tells the truth about the routes the app registers."""

from __future__ import annotations

from typing import Any

from service.config import Settings
from service.http.app import create_app
from service.http.openapi import DOCUMENT
from tests.conftest import ADMIN_TOKEN


def registered() -> set[tuple[str, str]]:
    app = create_app(Settings.from_env({"SYNCLOCK_ADMIN_TOKENS": ADMIN_TOKEN}))
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


def documented() -> set[tuple[str, str]]:
    return {(method, path) for path, item in DOCUMENT["paths"].items() for method in item}


def test_document_lists_exactly_the_registered_routes() -> None:
    assert documented() == registered()


def test_admin_routes_declare_auth_and_401() -> None:
    for path, item in DOCUMENT["paths"].items():
        for operation in item.values():
            if path.startswith("/admin"):
                assert operation["security"] == [{"admin": []}], path
                assert "401" in operation["responses"], path


async def test_served_document_is_openapi_31(make_client: Any) -> None:
    client = await make_client()
    response = await client.get("/openapi.json")
    body = await response.json()
    assert response.status == 200
    assert body["openapi"] == "3.1.0"
    assert body == DOCUMENT
