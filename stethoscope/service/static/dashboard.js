// Live dashboard: when the server says (server-sent events) that a result was stored or an
// alert changed, fetch this page's panel again (server-rendered HTML) and swap it in.
(function () {
  "use strict";
  var body = document.body;
  var panelUrl = body.getAttribute("data-panel");
  var machine = body.getAttribute("data-machine");
  var panel = document.getElementById("panel");
  var live = document.getElementById("live");
  var pending = null;
  var headers = { "X-Requested-With": "stethoscope" };

  function setLive(on, text) {
    if (!live) return;
    live.className = "live " + (on ? "on" : "off");
    live.textContent = text;
  }

  function refresh() {
    pending = null;
    fetch(panelUrl, { credentials: "same-origin", headers: headers })
      .then(function (r) {
        if (r.status === 401) { window.location.href = "/login"; return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html === null) return;
        panel.innerHTML = html;
        setLive(true, "live · updated " + new Date().toLocaleTimeString());
      })
      .catch(function () { setLive(false, "offline"); });
  }

  function schedule() { if (!pending) pending = setTimeout(refresh, 100); }

  function concerns(event) {
    try { return !machine || JSON.parse(event.data).machine === machine; }
    catch (e) { return true; }
  }

  if (panel && panelUrl && window.EventSource) {
    var source = new EventSource("/v1/events");
    source.onopen = function () { setLive(true, "live"); };
    source.onerror = function () { setLive(false, "reconnecting…"); };
    source.addEventListener("recording", function (e) { if (concerns(e)) schedule(); });
    source.addEventListener("alert", function (e) { if (concerns(e)) schedule(); });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("button[data-ack]") : null;
    if (!button) return;
    event.preventDefault();
    button.disabled = true;
    fetch("/v1/alerts/" + encodeURIComponent(button.getAttribute("data-ack")) + "/ack",
          { method: "POST", credentials: "same-origin", headers: headers })
      .then(function (r) {
        if (r.ok) { schedule(); return; }
        return r.json().then(function (j) {
          button.disabled = false;
          var message = document.getElementById("message");
          if (message) { message.hidden = false; message.textContent = j.error; }
        });
      })
      .catch(function () { button.disabled = false; });
  });
})();
