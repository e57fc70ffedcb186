"""Which provider serves a model name, with which key, model id, rules and prices."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import APIError, bad_request
from services.common.settings import Settings
from services.router.catalog import FineTunedModel, RouterCatalog

MOA_PREFIX = "openpipe:moa-"
BASE_PREFIX = "base/"  # openpipe:base/<base-model>: a base model on the model server, no adapter
MOA_SUFFIX = "-v1"


@dataclass(frozen=True)
class Route:
    provider: str  # "openai" | "azure" | "anthropic" | "gemini"
    base_url: str
    api_key: str | None
    upstream_model: str
    api_version: str | None = None
    pruning_rules: tuple[str, ...] = ()
    default_temperature: float | None = None
    input_price_per_million: float | None = None
    output_price_per_million: float | None = None


def model_not_found(model: str, why: str) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist or you do not have access to it: {why}",
        param="model",
        code="model_not_found",
    )


def _missing_key(provider: str) -> APIError:
    return bad_request(
        f"No {provider} API key is configured for this project: set it with PUT /api/v1/provider-keys.",
        param="model",
        code="provider_key_missing",
    )


def moa_base(model: str) -> str | None:
    """``openpipe:moa-gpt-4o-v1`` → ``gpt-4o``; None when the name is not a mixture of agents."""
    if (
        model.startswith(MOA_PREFIX)
        and model.endswith(MOA_SUFFIX)
        and len(model) > len(MOA_PREFIX + MOA_SUFFIX)
    ):
        base = model[len(MOA_PREFIX) : -len(MOA_SUFFIX)]
        if base.startswith("claude"):
            return f"anthropic:{base}"
        if base.startswith("gemini"):
            return f"gemini:{base}"
        return base
    return None


class ModelResolver:
    """Turns a request's model name into a ``Route``: provider, upstream model, credentials."""

    def __init__(self, catalog: RouterCatalog, settings: Settings) -> None:
        self.catalog = catalog
        self.settings = settings

    def resolve(self, project_id: str, model: str) -> Route:
        prefix, sep, name = model.partition(":")
        if not sep:
            return self._builtin(project_id, "openai", model, model)
        if not name:
            raise model_not_found(model, "empty model name after the provider prefix")
        if prefix == "openai":
            return self._builtin(project_id, "openai", name, model)
        if prefix in ("anthropic", "gemini"):
            return self._builtin(project_id, prefix, name, model)
        if prefix == "openpipe":
            return self._openpipe(project_id, name, model)
        raise model_not_found(
            model, f"unknown provider prefix {prefix!r} (use openai:, anthropic:, gemini: or openpipe:)"
        )

    def _builtin(self, project_id: str, provider: str, upstream_model: str, model: str) -> Route:
        key = self.catalog.provider_key(project_id, provider)
        if key is None:
            raise _missing_key({"openai": "OpenAI", "anthropic": "Anthropic", "gemini": "Gemini"}[provider])
        base_url = {
            "openai": self.settings.openai_base_url,
            "anthropic": self.settings.anthropic_base_url,
            "gemini": self.settings.gemini_base_url,
        }[provider]
        return Route(provider=provider, base_url=base_url, api_key=key, upstream_model=upstream_model)

    def _openpipe(self, project_id: str, name: str, model: str) -> Route:
        if name.startswith(BASE_PREFIX) and len(name) > len(BASE_PREFIX):
            return self._served_base(name[len(BASE_PREFIX) :])
        provider_slug, slash, external_model = name.partition("/")
        if slash:
            provider = self.catalog.external_provider(project_id, provider_slug)
            if provider is None:
                raise model_not_found(model, f"no external provider {provider_slug!r} in this project")
            known = provider.models.get(external_model)
            if provider.models and known is None:
                raise model_not_found(model, f"provider {provider_slug!r} has no model {external_model!r}")
            return Route(
                provider="azure" if provider.type == "azure" else "openai",
                base_url=provider.base_url,
                api_key=self.catalog.decrypt(provider.api_key_enc),
                upstream_model=external_model,
                api_version=provider.api_version,
                input_price_per_million=known.input_price_per_million if known else None,
                output_price_per_million=known.output_price_per_million if known else None,
            )
        deployment = self.catalog.deployment(project_id, name)
        if deployment is None and (fine_tuned := self.catalog.fine_tuned_model(project_id, name)):
            return self._fine_tuned(project_id, fine_tuned, model)
        if deployment is None:
            raise model_not_found(model, f"no deployed fine-tuned model {name!r} in this project")
        return Route(
            provider="openai",
            base_url=deployment.base_url,
            api_key=self.catalog.decrypt(deployment.api_key_enc),
            upstream_model=deployment.upstream_model,
            pruning_rules=deployment.pruning_rules,
            default_temperature=deployment.default_temperature,
            input_price_per_million=deployment.input_price_per_million,
            output_price_per_million=deployment.output_price_per_million,
        )

    # --- models served by the model server (locally) or vLLM (production), one per base ---------

    def serving_url(self, base_model: str) -> str:
        """The OpenAI base URL serving ``base_model``: its vLLM server, else the local model server."""
        url = self.settings.vllm_servers.get(base_model) or self.settings.resolved_model_server_url()
        return url.rstrip("/") + "/v1"

    def _served_base(self, base_model: str) -> Route:
        prices = base_model_prices(base_model)
        return Route(
            provider="openai",
            base_url=self.serving_url(base_model),
            api_key=None,
            upstream_model=base_model,
            input_price_per_million=prices[0] if prices else None,
            output_price_per_million=prices[1] if prices else None,
        )

    def _fine_tuned(self, project_id: str, fine_tuned: FineTunedModel, model: str) -> Route:
        if fine_tuned.status == "DEPRECATED":
            raise APIError(
                400,
                f"The model {model!r} is deprecated and no longer served: use a newer fine-tuned model.",
                param="model",
                code="model_deprecated",
            )
        if fine_tuned.status != "DEPLOYED":
            raise APIError(
                400,
                f"The model {model!r} is {fine_tuned.status}, not deployed yet: it can be called once "
                "its status is DEPLOYED.",
                param="model",
                code="model_not_deployed",
            )
        if fine_tuned.provider == "openai":
            route = self._builtin(project_id, "openai", fine_tuned.upstream_model or "", model)
            base_url, api_key, upstream = route.base_url, route.api_key, route.upstream_model
        else:
            base_url = self.serving_url(fine_tuned.base_model)
            api_key, upstream = None, fine_tuned.adapter_uri or ""
        return Route(
            provider="openai",
            base_url=base_url,
            api_key=api_key,
            upstream_model=upstream,
            pruning_rules=fine_tuned.pruning_rules,
            default_temperature=fine_tuned.default_temperature,
            input_price_per_million=fine_tuned.input_price_per_million,
            output_price_per_million=fine_tuned.output_price_per_million,
        )


def base_model_prices(base_model: str) -> tuple[float, float] | None:
    """Per-1M-token (input, output) prices of an open base model, by size (the seed's pricing table)."""
    try:
        from services.api.fine_tuning.catalog import base_info
    except ImportError:  # the api's catalog is not installed with this router
        return None
    info = base_info(base_model)
    return info.input_price_per_million, info.output_price_per_million
