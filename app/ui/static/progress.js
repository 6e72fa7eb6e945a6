// Live progress on a job page: poll the job's status once a second and update the page in place.
// Everything else on the pages works without JavaScript.
(function () {
  "use strict";
  var job = document.getElementById("job");
  if (!job || job.dataset.active !== "yes") { return; }
  var url = job.dataset.statusUrl;
  function update() {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
      .then(function (s) {
        document.getElementById("job-status").textContent = s.status;
        var bar = document.getElementById("job-progress");
        bar.max = s.total; bar.value = s.done;
        document.getElementById("job-done").textContent = s.done + " of " + s.total;
        if (s.status === "queued" || s.status === "running") {
          window.setTimeout(update, 1000);
        } else {
          window.location.reload();  // the finished page shows the dataset link or the reason it stopped
        }
      })
      .catch(function () { window.setTimeout(update, 5000); });
  }
  window.setTimeout(update, 1000);
})();
