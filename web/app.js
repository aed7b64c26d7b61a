// Minimal page: submit over REST and poll until the job ends.
const form = document.querySelector("#submit");
const status = document.querySelector("#status");
const images = document.querySelector("#images");

async function poll(url) {
  for (;;) {
    const job = await (await fetch(url)).json();
    status.textContent = `${job.status} — step ${job.progress.step}/${job.progress.total}`;
    if (job.status === "completed") {
      images.replaceChildren(...job.result.images.map((image) => {
        const img = document.createElement("img");
        img.src = image.url;
        img.alt = `generated image, seed ${image.seed}`;
        return img;
      }));
      return;
    }
    if (job.status === "failed") { status.textContent = `failed: ${job.error.message}`; return; }
    if (job.status === "canceled") return;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const response = await fetch("/v1/jobs", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt: form.prompt.value, width: 64, height: 64 }),
  });
  const body = await response.json();
  if (!response.ok) { status.textContent = body.detail; return; }
  await poll(response.headers.get("Location"));
});
