"""``meshgate sagas list / show / retry`` against a service instance on loopback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from meshgate.cli import app
from meshgate.data import Database
from meshgate.events import Saga, StepContext, StepFailed
from meshgate.service import Service
from meshgate.service.testing import serving


def orders_service(tmp_path: Path) -> tuple[Service, Saga]:
    service = Service("orders", database=Database(f"sqlite:///{tmp_path / 'orders.db'}"))
    saga = Saga("place-order")

    @saga.step("reserve", compensation_attempts=2, retry_delay=0.01)
    async def reserve(ctx: StepContext) -> dict[str, int]:
        return {"reserved": ctx.input["n"]}

    @reserve.compensate
    async def release(ctx: StepContext) -> None:
        if ctx.input.get("stuck"):
            raise RuntimeError("inventory is down")

    @saga.step("charge")
    async def charge(ctx: StepContext) -> None:
        if ctx.input["n"] % 2:
            raise StepFailed("card declined")

    service.events.saga(saga)
    return service, saga


async def test_list_show_and_retry(tmp_path: Path) -> None:
    service, saga = orders_service(tmp_path)
    await service.events.create_tables()
    runner = service.events.sagas
    runner.poll_interval = 0.05
    async with serving(service) as address:
        assert service.database is not None
        ids = []
        for n, stuck in ((2, False), (3, False), (5, True)):
            async with service.database.session() as session:
                ids.append(await saga.start(session, {"n": n, "stuck": stuck}))

        async def settled() -> None:
            async with asyncio.timeout(20):
                while (await runner.counts()) != {"completed": 1, "compensated": 1, "stuck": 1}:
                    await asyncio.sleep(0.05)

        await settled()
        url = f"http://{address}"
        cli = CliRunner()

        def run(*args: str) -> object:
            return cli.invoke(app, ["sagas", *args, "--url", url], env={"COLUMNS": "250"})

        listed = await asyncio.to_thread(run, "list")
        text = listed.output  # type: ignore[attr-defined]
        assert listed.exit_code == 0, text  # type: ignore[attr-defined]
        for saga_id in ids:
            assert saga_id in text
        assert "1 completed" in text
        assert "1 stuck" in text
        stuck = json.loads(
            (await asyncio.to_thread(run, "list", "--status", "stuck", "--json")).output
        )  # type: ignore[attr-defined]
        assert [s["id"] for s in stuck["sagas"]] == [ids[2]]
        shown = await asyncio.to_thread(run, "show", ids[1])
        text = shown.output  # type: ignore[attr-defined]
        assert "compensated" in text
        assert "card declined" in text
        assert "compensation" in text
        as_json = json.loads((await asyncio.to_thread(run, "show", ids[0], "--json")).output)  # type: ignore[attr-defined]
        assert [a["step"] for a in as_json["attempts"]] == ["reserve", "charge"]
        assert as_json["results"]["reserve"] == {"reserved": 2}
        refused = await asyncio.to_thread(run, "retry", ids[0])
        assert refused.exit_code == 1  # type: ignore[attr-defined]
        assert "is completed, not stuck" in refused.output  # type: ignore[attr-defined]
        retried = await asyncio.to_thread(run, "retry", ids[2])
        assert retried.exit_code == 0, retried.output  # type: ignore[attr-defined]
        missing = await asyncio.to_thread(run, "show", "nope")
        assert missing.exit_code == 1  # type: ignore[attr-defined]
        assert "no saga 'nope'" in missing.output  # type: ignore[attr-defined]


def test_without_a_running_system_the_fix_is_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sagas", "list", "--file", str(tmp_path / "meshgate.yaml")])
    assert result.exit_code == 1
    assert "no running system" in result.output
    assert "--url" in result.output
