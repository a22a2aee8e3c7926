/* Laulima dashboards, version 1: keep regions marked data-live="URL" current without a reload.
   Each region polls its URL every data-every milliseconds (default 2000) with the ETag it
   last got; 304 leaves it alone, 200 replaces its content, 401 goes to the sign-in page.
   Polling pauses while the tab is hidden; a <details> with an id that the reader opened stays
   open across a refresh. No other script runs on these pages. */
(function () {
  "use strict";
  function say(text) {
    var status = document.getElementById("live-status");
    if (status && status.textContent !== text) status.textContent = text;
  }
  function watch(region) {
    var url = region.getAttribute("data-live");
    var every = Number(region.getAttribute("data-every")) || 2000;
    var etag = region.getAttribute("data-etag");
    function later() { window.setTimeout(tick, every); }
    function tick() {
      if (document.hidden) { later(); return; }
      var headers = etag ? { "If-None-Match": etag } : {};
      fetch(url, { headers: headers, credentials: "same-origin", cache: "no-cache" }).then(function (response) {
        if (response.status === 401) {
          var login = document.body.getAttribute("data-login");
          window.location.assign(login + "?next=" + encodeURIComponent(window.location.pathname));
          return null;
        }
        if (response.status === 304) { say(""); later(); return null; }
        if (!response.ok) { say("Live updates paused: the server answered " + response.status + "; retrying."); later(); return null; }
        etag = response.headers.get("ETag");
        return response.text().then(function (html) {
          var open = [];  // what the reader unfolded stays unfolded
          var unfolded = region.querySelectorAll("details[open][id]");
          for (var i = 0; i < unfolded.length; i++) open.push(unfolded[i].id);
          region.innerHTML = html;
          for (var j = 0; j < open.length; j++) {
            var again = document.getElementById(open[j]);
            if (again) again.open = true;
          }
          region.setAttribute("data-refreshed", String(Date.now()));
          say("");
          later();
        });
      }).catch(function () {
        say("Live updates paused: the server cannot be reached; retrying.");
        later();
      });
    }
    later();
  }
  document.addEventListener("DOMContentLoaded", function () {
    var regions = document.querySelectorAll("[data-live]");
    for (var i = 0; i < regions.length; i++) watch(regions[i]);
  });
})();
