// One WebSocket to /v1/ws that survives drops: it reconnects with back-off and
// re-subscribes every watched job after the last seq the page has seen, so no
// step is lost or shown twice (the server replays, or sends a snapshot).

const BACKOFF_S = [0.5, 1, 2, 4, 8];

export class Connection {
  constructor({ onEvent, onStatus }) {
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.watched = new Map(); // job id -> last seq seen (null: not known yet)
    this.attempt = 0;
    this.socket = null;
    this.url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;
  }

  connect() {
    const socket = new WebSocket(this.url);
    this.socket = socket;
    socket.addEventListener("open", () => {
      this.attempt = 0;
      this.onStatus({ up: true, text: "Live" });
      for (const [jobId, lastSeq] of this.watched) this.#subscribe(jobId, lastSeq);
    });
    socket.addEventListener("message", (message) => {
      const event = JSON.parse(message.data);
      if (event.job_id && event.seq !== undefined) {
        const seen = this.watched.get(event.job_id);
        if (seen !== undefined && seen !== null && event.seq <= seen) return; // already shown
        if (this.watched.has(event.job_id)) this.watched.set(event.job_id, event.seq);
      }
      if (event.type === "snapshot" && this.watched.has(event.job_id)) {
        this.watched.set(event.job_id, event.job.last_seq);
      }
      this.onEvent(event);
    });
    socket.addEventListener("close", () => {
      if (this.socket !== socket) return;
      const delay = BACKOFF_S[Math.min(this.attempt, BACKOFF_S.length - 1)];
      this.attempt += 1;
      const jitter = delay * (0.8 + Math.random() * 0.4);
      this.onStatus({ up: false, text: `Connection lost — reconnecting in ${jitter.toFixed(1)} s…` });
      setTimeout(() => this.connect(), jitter * 1000);
    });
  }

  /** Watch a job from after `lastSeq` (null: start with a snapshot). */
  watch(jobId, lastSeq) {
    if (this.watched.has(jobId)) return;
    this.watched.set(jobId, lastSeq);
    this.#subscribe(jobId, lastSeq);
  }

  forget(jobId) {
    this.watched.delete(jobId);
  }

  #subscribe(jobId, lastSeq) {
    if (this.socket?.readyState !== WebSocket.OPEN) return; // sent again on (re)connect
    const message = { type: "subscribe", job_id: jobId };
    if (lastSeq !== null) message.after_seq = lastSeq;
    this.socket.send(JSON.stringify(message));
  }
}
