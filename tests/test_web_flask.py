"""kmagent.web.flask.Kmagent through Flask's test client: a hook (or Flask-Login's
user) names each request's person, anonymous requests have none, KM.identify lasts for
its request, streamed responses keep their person; configuration from app.config."""

from __future__ import annotations

import pytest

flask = pytest.importorskip("flask")

from kmagent import KM, InvalidEvent  # noqa: E402
from kmagent.web.flask import Kmagent  # noqa: E402
from test_web import people  # noqa: E402


def record(event: str) -> str:
    try:
        KM.record(event)
    except InvalidEvent:
        return "anonymous"
    return "recorded"


def make_app(spool_path, **extension) -> flask.Flask:
    app = flask.Flask(__name__)
    app.config.update(KMAGENT_SPOOL=str(spool_path), SECRET_KEY="test")

    @app.get("/view")
    def view():
        return record("Viewed Page")

    @app.get("/identify")
    def identify():
        KM.identify(flask.request.args["person"])
        return record("Identified")

    @app.get("/stream")
    def stream():
        def body():
            yield "first "
            yield record("Streamed")
        return flask.Response(body())
    Kmagent(app, **extension)
    return app


@pytest.fixture
def restore_km():
    saved = KM._client
    yield
    KM.clear_identity()
    current, KM._client = KM._client, saved
    if current is not None and current is not saved:
        current.close()


def test_a_hook_names_the_person_and_anonymous_requests_have_none(spool_path, restore_km):
    app = make_app(spool_path, identify=lambda: flask.request.headers.get("X-User"))
    client = app.test_client()
    assert client.get("/view", headers={"X-User": "alice"}).text == "recorded"
    assert client.get("/view").text == "anonymous"
    assert client.get("/identify", query_string={"person": "bob"}).text == "recorded"
    assert client.get("/view").text == "anonymous"
    assert client.get("/stream", headers={"X-User": "carol"}).text == "first recorded"
    assert client.get("/stream").text == "first anonymous"
    assert people(spool_path) == [("Viewed Page", "alice"), ("Identified", "bob"),
                                  ("Streamed", "carol")]


def test_flask_login_user_by_default(spool_path, restore_km):
    flask_login = pytest.importorskip("flask_login")

    class User(flask_login.UserMixin):
        def __init__(self, user_id: str) -> None:
            self.id = user_id
    app = make_app(spool_path)
    manager = flask_login.LoginManager(app)
    manager.user_loader(User)

    @app.get("/login")
    def login():
        record("Before Login")
        flask_login.login_user(User("u-17"))
        return record("Logged In")

    @app.get("/logout")
    def logout():
        record("Before Logout")
        flask_login.logout_user()
        return record("After Logout")

    @app.get("/stream-logout")
    def stream_logout():
        flask_login.logout_user()  # the body streams after the request context is gone

        def body():
            yield record("Streamed")
        return flask.Response(body())
    client = app.test_client()
    assert client.get("/view").text == "anonymous"
    assert client.get("/login").text == "recorded"  # from the login on
    assert client.get("/view").text == "recorded"
    assert app.test_client().get("/view").text == "anonymous"  # another visitor
    assert client.get("/logout").text == "anonymous"  # from the logout on
    client.get("/login")
    assert client.get("/stream-logout").text == "anonymous"
    assert people(spool_path) == [("Logged In", "u-17"), ("Viewed Page", "u-17"),
                                  ("Before Logout", "u-17"), ("Logged In", "u-17")]


def test_init_app_in_a_factory(spool_path, restore_km):
    extension = Kmagent(identify=lambda: "factory-user")
    app = flask.Flask(__name__)
    app.config["KMAGENT_SPOOL"] = str(spool_path)
    app.get("/view")(lambda: record("Viewed Page"))
    extension.init_app(app)
    assert app.extensions["kmagent"] is extension
    assert app.test_client().get("/view").text == "recorded"
    assert people(spool_path) == [("Viewed Page", "factory-user")]


def test_a_before_request_that_aborts_first_still_has_the_person(spool_path, restore_km):
    app = flask.Flask(__name__)
    app.config.update(KMAGENT_SPOOL=str(spool_path), SECRET_KEY="test")

    @app.before_request  # registered before the extension: a CSRF check, say
    def refuse():
        if flask.request.path == "/refused":
            flask.abort(400)
    Kmagent(app, identify=lambda: flask.request.headers.get("X-User"))

    @app.after_request
    def track(response):
        record(f"Answered {response.status_code}")
        return response
    app.get("/fine")(lambda: "fine")
    client = app.test_client()
    client.get("/fine", headers={"X-User": "alice"})
    client.get("/refused", headers={"X-User": "alice"})
    assert people(spool_path) == [("Answered 200", "alice"), ("Answered 400", "alice")]


def test_a_test_request_context_leaves_no_one_on_the_thread(spool_path, restore_km):
    app = make_app(spool_path, identify=lambda: "alice")
    with app.test_request_context("/view"):
        app.preprocess_request()
    assert record("After") == "anonymous"
