"""The public surface: what ``chatbus`` exports, under which names, made how."""

from __future__ import annotations

import inspect
import types

import pytest

import chatbus
import chatbus.memory
import chatbus.postgres
import chatbus.redis
import chatbus.testing

PUBLIC_MODULES = [chatbus, chatbus.memory, chatbus.postgres, chatbus.redis, chatbus.testing]


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_all_lists_exactly_the_public_names(module: types.ModuleType) -> None:
    defined_here = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and (
            value.__module__ == module.__name__
            or value.__module__.startswith(module.__name__ + "._")
        )
    }
    assert set(module.__all__) >= defined_here
    for name in module.__all__:
        assert hasattr(module, name), name


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_public_classes_and_functions_claim_a_public_module(module: types.ModuleType) -> None:
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            owner = value.__module__
            assert not any(part.startswith("_") for part in owner.split(".")), (name, owner)


def test_methods_have_public_qualified_names() -> None:
    assert chatbus.Subscriber.receive.__module__ == "chatbus"
    assert chatbus.Bus.__module__ == "chatbus"
    assert chatbus.postgres.PostgresStore.__module__ == "chatbus.postgres"
    assert chatbus.redis.RedisStore.__module__ == "chatbus.redis"
    assert chatbus.StoreError.__module__ == "chatbus"


@pytest.mark.parametrize("cls", [chatbus.Bus, chatbus.Publisher, chatbus.Subscriber])
def test_resources_have_no_public_constructor(cls: type) -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        cls()


async def test_publisher_and_subscriber_open_alike() -> None:
    async with chatbus.open_bus() as bus:
        publisher = bus.open_publisher("s")
        subscriber = bus.open_subscriber("s")
        assert type(publisher).__aenter__ and type(subscriber).__aenter__
        async with publisher as pub, subscriber as sub:
            assert pub is publisher and sub is subscriber
            await pub.publish("hi")
            assert (await sub.receive()).body == "hi"
