from __future__ import annotations

from tests.conftest import ProxyFactory


async def test_allowed_preflight_answered_locally(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    response = await client.options(
        "/x", headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "PUT"}
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"


async def test_actual_request_forwarded(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    response = await client.get("/a%2Fb?x=1&x=2", headers={"Origin": "https://evil-example.com"})
    assert response.status == 200
    body = await response.json()
    assert body["raw_path"] == "/a%2Fb?x=1&x=2"
    assert "Access-Control-Allow-Origin" not in response.headers
