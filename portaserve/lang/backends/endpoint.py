"""``RuntimeEndpoint``: a portaserve (or SGLang) server over its native HTTP API."""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Optional

import requests

from portaserve.lang import chat_template as ct
from portaserve.lang.backends.base import Backend
from portaserve.lang.errors import LangError

logger = logging.getLogger("portaserve.lang")


class RuntimeEndpoint(Backend):
    def __init__(self, base_url: str, api_key: Optional[str] = None, chat_template=None,
                 timeout: float = 600.0, max_connections: int = 64):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=max_connections)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._template_spec = chat_template
        self._template = None
        self._lock = threading.Lock()
        self.model_info = self._request("GET", "/get_model_info").json()

    # ---- transport ----------------------------------------------------------------------
    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _request(self, method: str, path: str, **kw) -> requests.Response:
        try:
            r = self._session.request(method, self.base_url + path, headers=self._headers(),
                                      timeout=self.timeout, **kw)
        except requests.RequestException as e:
            raise LangError(f"{method} {path} failed: {e}") from None
        if r.status_code != 200:
            raise LangError(f"{path} returned HTTP {r.status_code}: {_error_message(r.text)}",
                            r.status_code)
        return r

    def generate(self, text, sampling_params, *, return_logprob=False, logprob_start_len=None,
                 top_logprobs_num=None, stream=False, input_ids=None):
        body = {"sampling_params": sampling_params}
        body.update({"text": text} if input_ids is None else {"input_ids": input_ids})
        if return_logprob:
            body.update(return_logprob=True, return_text_in_logprobs=True)
            if logprob_start_len is not None:
                body["logprob_start_len"] = logprob_start_len
            if top_logprobs_num:
                body["top_logprobs_num"] = top_logprobs_num
        if not stream:
            return self._request("POST", "/generate", json=body).json()
        body["stream"] = True
        return self._stream(body)

    def _stream(self, body):
        r = self._request("POST", "/generate", json=body, stream=True)
        with r:
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise LangError(f"/generate stream failed: {_error_message(data)}")
                yield chunk

    # ---- chat template ------------------------------------------------------------------
    def chat_template(self) -> ct.ChatTemplate:
        with self._lock:
            if self._template is None:
                self._template = ct.resolve(self._template_spec, self._server_template)
            return self._template

    def _server_template(self) -> ct.ChatTemplate:
        """The server's template: a ``chat_template`` field of /get_model_info where the
        server sends one, else the tokenizer at the model path it reports, if that path
        exists on this machine, else plain ``Role: content`` lines."""
        info = self.model_info
        if info.get("chat_template"):
            return ct.ChatTemplate.from_jinja(info["chat_template"], info.get("bos_token") or "",
                                              info.get("eos_token") or "")
        path = info.get("tokenizer_path") or info.get("model_path")
        if path and os.path.exists(path):
            try:
                return ct.ChatTemplate.from_tokenizer(_load_tokenizer(path))
            except Exception as e:  # noqa: BLE001 - fall back below, but say why
                logger.warning("could not load the tokenizer at %s: %s", path, e)
        logger.warning("no chat template from the server at %s; roles render as plain "
                       "'Role: content' lines (pass chat_template=... to override)", self.base_url)
        return ct.plain()

    # ---- extras -------------------------------------------------------------------------
    def flush_cache(self) -> None:
        self._request("POST", "/flush_cache")

    def server_info(self) -> dict:
        return self._request("GET", "/server_info").json()


def _load_tokenizer(path: str):
    from portaserve.models.loader import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(path))


def _error_message(body: str) -> str:
    try:
        obj = json.loads(body)
    except ValueError:
        return body.strip()[:2000]
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
    return body.strip()[:2000]
