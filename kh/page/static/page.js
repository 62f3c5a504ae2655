// kh's live page: fetch the live part again every few seconds (read-only GETs, same origin).
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!live) return;
  const every = 1000 * (parseInt(live.dataset.refresh, 10) || 2);
  async function refresh() {
    try {
      const r = await fetch("/live", {credentials: "same-origin", cache: "no-store"});
      if (r.status === 401) { window.location.assign("/"); return; }
      if (r.ok) live.innerHTML = await r.text();
    } catch (e) { /* khd away: try again */ }
    setTimeout(refresh, every);
  }
  setTimeout(refresh, every);
})();
