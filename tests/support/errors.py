"""The one error shape every JSON error of the API must have."""

from qa_service.web.errors import ERROR_CODES

# Reached only by an app that takes writes or is overloaded: walked in test_web_writes.py.
WALKED_IN_WRITE_TESTS = {"article_id_invalid", "article_text_invalid", "article_field_invalid", "url_invalid",
                         "article_not_writable", "unauthorized", "last_article",
                         "seeds_out_of_sync", "overloaded", "write_busy", "writes_unavailable"}


def assert_error_shape(r, status, code):
    """Assert ``r`` is the JSON error ``code`` with ``status``, a sentence for a message, and no leaked paths."""
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True))
    assert r.mimetype == "application/json"
    body = r.get_json()
    assert set(body) == {"ok", "error"} and body["ok"] is False
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    message = body["error"]["message"]
    assert isinstance(message, str) and len(message) > 10 and message[0].isupper() and message.endswith(".")
    text = r.get_data(as_text=True)
    for leak in ("Traceback", "File \"", "/tmp", "/work", "site-packages", ".py"):
        assert leak not in text
    assert code in ERROR_CODES and ERROR_CODES[code][0] == status
