/*
 * <mpc-progress src="SHARE_URL"></mpc-progress>: a live progress bar of the one task a share link names.
 *
 * Load it with <script src="<prefix>/mpc-progress.js" defer></script> (the extension serves it) on a page
 * of the app's own origin. The element follows <share url>/events (Server-Sent Events) and shows a
 * <progress> bar, the task's status and its last progress message; with the `details` attribute, also its
 * result and the files it produced. Without `src`, it follows the page it is in (the share link's page).
 * It builds its DOM with textContent only: whatever the task wrote is shown as text. Each change
 * dispatches an `mpc-update` event (detail: the task as the link shows it). Style it through its classes
 * (mpc-progress-bar, -status, -message, -result, -artifacts) and its data-status attribute.
 */
(() => {
  "use strict";
  if (window.customElements.get("mpc-progress")) {
    return;
  }
  const ENDED = new Set(["succeeded", "failed", "stopped", "timed_out", "lost", "purged"]);
  const KINDS = ["task", "queued", "started", "progress", "stopping", "paused", "resumed", "requeued",
    "adopted", "ended", "purged"];
  const LABELS = {
    queued: "Queued", running: "Running", paused: "Paused", stopping: "Stopping", succeeded: "Done",
    failed: "Failed", stopped: "Stopped", timed_out: "Timed out", lost: "Lost", purged: "No longer kept",
  };

  function make(tag, className, text) {
    const made = document.createElement(tag);
    if (className) {
      made.className = className;
    }
    if (text !== undefined) {
      made.textContent = text;
    }
    return made;
  }

  function asText(value) {
    if (value === null || value === undefined) {
      return "";
    }
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  function bytes(size) {
    if (typeof size !== "number") {
      return "";
    }
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = size;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
  }

  class MpcProgress extends HTMLElement {
    static get observedAttributes() {
      return ["src"];
    }

    constructor() {
      super();
      this.task = {};
      this.source = null;
      this.bar = null;
    }

    connectedCallback() {
      this.build();
      this.follow();
    }

    disconnectedCallback() {
      this.close();
    }

    attributeChangedCallback() {
      if (this.isConnected && this.bar) {
        this.task = {};
        this.follow();
      }
    }

    /** The share link followed: `src`, else the page's own URL. */
    link() {
      return new URL(this.getAttribute("src") || window.location.href, window.location.href);
    }

    /** A URL under the share link (its token kept). */
    under(path) {
      const link = this.link();
      const url = new URL(link.href);
      url.pathname = link.pathname.replace(/\/+$/, "") + path;
      url.hash = "";
      return url;
    }

    build() {
      if (this.bar) {
        return;
      }
      this.bar = make("progress", "mpc-progress-bar");
      this.bar.max = 100;
      this.status = make("span", "mpc-progress-status", "Connecting…");
      this.status.setAttribute("role", "status");
      this.status.setAttribute("aria-live", "polite");
      this.message = make("span", "mpc-progress-message");
      this.append(this.bar, this.status, this.message);
      this.details = this.hasAttribute("details") ? make("div", "mpc-progress-details") : null;
      if (this.details) {
        this.append(this.details);
      }
    }

    follow() {
      this.close();
      const source = new EventSource(this.under("/events"));
      this.source = source;
      for (const kind of KINDS) {
        source.addEventListener(kind, (event) => this.update(kind, JSON.parse(event.data)));
      }
      source.addEventListener("error", () => {
        if (source.readyState === EventSource.CLOSED && this.source === source) {
          this.refused();
        }
      });
    }

    close() {
      if (this.source) {
        this.source.close();
        this.source = null;
      }
    }

    /** The stream was refused (an expired or altered link): show the server's reason. */
    refused() {
      this.source = null;
      fetch(this.link(), { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then((answer) => answer.json())
        .then((body) => {
          if (body && typeof body.uuid === "string") {
            this.update("task", body);
          } else {
            this.fail(body && typeof body.message === "string" ? body.message : "This task cannot be shown.");
          }
        })
        .catch(() => this.fail("This task cannot be shown now."));
    }

    fail(text) {
      this.dataset.status = "unavailable";
      this.status.textContent = "Unavailable";
      this.message.textContent = text;
    }

    update(kind, data) {
      if (kind === "task" || kind === "purged") {
        this.task = {};
      }
      Object.assign(this.task, data);
      if (ENDED.has(this.task.status)) {
        this.close();
      }
      this.render();
      this.dispatchEvent(new CustomEvent("mpc-update", { detail: { ...this.task }, bubbles: true }));
    }

    render() {
      const task = this.task;
      const status = typeof task.status === "string" ? task.status : "";
      this.dataset.status = status;
      let percent = typeof task.percent === "number" ? Math.max(0, Math.min(100, task.percent)) : null;
      if (status === "succeeded") {
        percent = 100;
      }
      if (percent === null && !ENDED.has(status)) {
        this.bar.removeAttribute("value"); // indeterminate: nothing tells how far it got
      } else {
        this.bar.value = percent === null ? 0 : percent;
      }
      const label = LABELS[status] || status;
      this.status.textContent = percent === null || ENDED.has(status) ? label : `${label} ${Math.round(percent)} %`;
      const error = task.error && typeof task.error === "object" ? task.error : null;
      this.message.textContent = error ? asText(error.message || error.type) : asText(task.progress);
      if (this.details) {
        this.renderDetails(task);
      }
    }

    renderDetails(task) {
      const parts = [];
      if (task.result !== undefined && task.result !== null) {
        const text = typeof task.result === "string" ? task.result : JSON.stringify(task.result, null, 2);
        parts.push(make("h2", "", "Result"), make("pre", "mpc-progress-result", text));
      }
      if (Array.isArray(task.artifacts) && task.artifacts.length) {
        const list = make("ul", "mpc-progress-artifacts");
        for (const artifact of task.artifacts) {
          const name = asText(artifact && artifact.name);
          const link = make("a", "", name);
          link.href = this.under(`/artifacts/${encodeURIComponent(name)}`).href;
          link.setAttribute("download", name);
          const item = make("li");
          item.append(link, make("span", "mpc-progress-size", ` ${bytes(artifact.size)}`));
          list.append(item);
        }
        parts.push(make("h2", "", "Files"), list);
      }
      this.details.replaceChildren(...parts);
    }
  }

  window.customElements.define("mpc-progress", MpcProgress);
})();
