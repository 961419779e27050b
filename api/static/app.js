// The wallet page: talks to the public API like any client. Money never touches a float:
// amounts are decimal strings on the wire and BigInt cents here.
"use strict";

const state = { token: null, wallet: null };
const $ = (id) => document.getElementById(id);

class Problem extends Error {
  constructor(status, body) {
    super(body && body.title ? body.title : `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

async function api(path, { method = "GET", body, headers = {} } = {}) {
  const sent = { method, headers: { ...headers } };
  if (state.token) sent.headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) {
    sent.headers["Content-Type"] = "application/json";
    sent.body = JSON.stringify(body);
  }
  const response = await fetch(path, sent);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok && response.status !== 202) throw new Problem(response.status, data);
  return { status: response.status, data };
}

// --- money, exactly ---
function toCents(text) {
  const match = /^([0-9]+)(?:\.([0-9]{1,2}))?$/.exec(text.trim());
  if (!match) throw new Error("Enter an amount like 10.25: digits, at most two decimals.");
  return BigInt(match[1]) * 100n + BigInt((match[2] || "0").padEnd(2, "0"));
}
function fromCents(cents) {
  const sign = cents < 0n ? "-" : "";
  const abs = cents < 0n ? -cents : cents;
  return `${sign}${abs / 100n}.${(abs % 100n).toString().padStart(2, "0")}`;
}

// --- messages ---
function say(text, kind = "problem") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
}
function quiet() { $("message").hidden = true; }
function sayProblem(error) {
  if (error instanceof Problem) {
    const b = error.body;
    const fields = (b.errors || []).map((e) => `${e.field} ${e.reason}`).join("; ");
    say(`${b.title || "Error"} (${error.status}): ${b.detail || fields || ""}`.trim());
    if (error.status === 401) showAuth();
  } else {
    say(error.message);
  }
}

// --- signing in ---
function showAuth() { $("auth").hidden = false; $("main").hidden = true; }
function showMain() { $("auth").hidden = true; $("main").hidden = false; }

async function signIn(register) {
  const credentials = { username: $("username").value, password: $("password").value };
  try {
    if (register) await api("/api/auth/users", { method: "POST", body: credentials });
    const { data } = await api("/api/auth/token", { method: "POST", body: credentials });
    state.token = data.access_token;
    $("who").textContent = `Signed in as ${credentials.username.toLowerCase()}`;
    $("who").hidden = false;
    quiet();
    showMain();
    await loadWallets();
  } catch (error) { sayProblem(error); }
}

// --- wallets ---
// `select`: the wallet to show; else the one picked when the list comes in (the person may
// have picked another while it was on its way).
async function loadWallets(select) {
  const { data } = await api("/api/v1/wallets?limit=100");
  const list = $("wallet-select");
  list.replaceChildren(...data.items.map((w) => new Option(`${w.id.slice(0, 8)}… ${w.balance}`, w.id)));
  const wanted = select || state.wallet;
  if (data.items.some((w) => w.id === wanted)) list.value = wanted;
  state.wallet = list.value || null;
  $("own-wallets").replaceChildren(...data.items.map((w) => new Option(`${w.balance}`, w.id)));
  await showWallet();
}

async function showWallet() {
  if (!state.wallet) {
    $("balance").textContent = "–";
    $("history").tBodies[0].replaceChildren();
    $("holds").tBodies[0].replaceChildren();
    return;
  }
  const shown = state.wallet;
  const [{ data: wallet }, { data: page }, { data: holds }] = await Promise.all([
    api(`/api/v1/wallets/${shown}`),
    api(`/api/v1/wallets/${shown}/operations?limit=20`),
    api(`/api/v1/wallets/${shown}/holds?status=held&limit=20`),
  ]);
  if (state.wallet !== shown) return; // another was picked meanwhile: its own call shows it
  $("balance").textContent = wallet.balance;
  $("available").textContent = wallet.available;
  $("holds").tBodies[0].replaceChildren(...holds.items.map(holdRow));
  const option = $("wallet-select").selectedOptions[0];
  if (option) option.textContent = `${wallet.id.slice(0, 8)}… ${wallet.balance}`;
  $("history").tBodies[0].replaceChildren(...page.items.map(historyRow));
}

const short = (id) => `${id.slice(0, 8)}…`;
const KINDS = {
  DEPOSIT: () => "Deposit",
  WITHDRAW: () => "Withdraw",
  TRANSFER_OUT: (op) => `Transfer to ${short(op.counterparty)}`,
  TRANSFER_IN: (op) => `Transfer from ${short(op.counterparty)}`,
  TRANSFER_RETURN: (op) => `Returned, not taken by ${short(op.counterparty)}`,
  HOLD: (op) => `Hold ${short(op.hold_id)}`,
  HOLD_CAPTURE: (op) => `Hold ${short(op.hold_id)} captured` + (op.counterparty ? `, paid to ${short(op.counterparty)}` : ""),
  HOLD_VOID: (op) => `Hold ${short(op.hold_id)} voided`,
  HOLD_EXPIRE: (op) => `Hold ${short(op.hold_id)} expired`,
};

function holdRow(hold) {
  const row = document.createElement("tr");
  const cells = [short(hold.id), hold.amount, new Date(hold.expires_at).toLocaleString()];
  cells.forEach((text, i) => {
    const cell = document.createElement("td");
    cell.textContent = text;
    if (i === 1) cell.className = "amount";
    row.append(cell);
  });
  const actions = document.createElement("td");
  for (const [action, label] of [["capture", "Capture"], ["void", "Void"]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.className = "secondary";
    button.setAttribute("aria-label", `${label} hold ${short(hold.id)}`);
    button.addEventListener("click", () => endHold(hold.id, action));
    actions.append(button);
  }
  row.append(actions);
  return row;
}

async function placeHold(event) {
  event.preventDefault();
  if (!state.wallet) { say("Create or pick a wallet first."); return; }
  try {
    const cents = toCents($("hold-amount").value);
    const expires = $("hold-expires").value.trim();
    const body = { amount: fromCents(cents) };
    if (expires) body.expires_in = Number(expires);
    const { status, data } = await api(`/api/v1/wallets/${state.wallet}/holds`, {
      method: "POST", body, headers: { "Idempotency-Key": crypto.randomUUID() },
    });
    if (status === 202) say("Queued; the hold shows once placed.", "info");
    else say(`Held ${data.amount}; ${data.available} is available.`, "info");
  } catch (error) { sayProblem(error); }
  await showWallet().catch(sayProblem);
}

async function endHold(holdId, action) {
  try {
    const { data } = await api(`/api/v1/holds/${holdId}/${action}`, {
      method: "POST", body: {}, headers: { "Idempotency-Key": crypto.randomUUID() },
    });
    say(action === "capture" ? `Captured ${data.captured}; the balance is ${data.balance}.`
      : `Voided; ${data.available} is available.`, "info");
  } catch (error) { sayProblem(error); }
  await loadWallets().catch(sayProblem);
}

function historyRow(op) {
  const row = document.createElement("tr");
  row.className = op.status;
  const cells = [
    new Date(op.created_at).toLocaleTimeString(),
    KINDS[op.operation_type](op),
    op.amount,
    op.status === "applied" ? "applied" : `rejected: ${op.reason.replace("_", " ")}`,
    op.balance,
  ];
  cells.forEach((text, i) => {
    const cell = document.createElement("td");
    cell.textContent = text;
    if (i === 2) cell.className = "amount";
    if (i === 4) cell.className = "after";
    row.append(cell);
  });
  return row;
}

async function newWallet() {
  try {
    const { data } = await api("/api/v1/wallets", { method: "POST" });
    await loadWallets(data.id);
    say(`New wallet ${data.id}`, "info");
  } catch (error) { sayProblem(error); }
}

async function operate(event) {
  event.preventDefault();
  if (!state.wallet) { say("Create or pick a wallet first."); return; }
  const kind = $("op-type").value;
  try {
    const cents = toCents($("op-amount").value);
    const { status, data } = await api(`/api/v1/wallets/${state.wallet}/operation`, {
      method: "POST",
      body: { operationType: kind, amount: fromCents(cents) },
      headers: { "Idempotency-Key": crypto.randomUUID() },
    });
    if (status === 202) say("Queued; the outcome is not in yet. It shows in the history once applied.", "info");
    else say(`${kind === "DEPOSIT" ? "Deposited" : "Withdrew"} ${data.amount}; the balance is ${data.balance}.`, "info");
  } catch (error) { sayProblem(error); }
  await showWallet().catch(sayProblem);
}

async function transfer(event) {
  event.preventDefault();
  if (!state.wallet) { say("Create or pick a wallet first."); return; }
  const to = $("transfer-to").value.trim().toLowerCase();
  try {
    const cents = toCents($("transfer-amount").value);
    const { status, data } = await api("/api/v1/transfers", {
      method: "POST",
      body: { from: state.wallet, to, amount: fromCents(cents) },
      headers: { "Idempotency-Key": crypto.randomUUID() },
    });
    if (status === 202) say(`Sent; it is ${data.status.replace("_", " ")}. It shows in the history once both wallets hold it.`, "info");
    else say(`Sent ${data.amount} to ${short(data.to)}; the balance is ${data.balance}.`, "info");
  } catch (error) { sayProblem(error); }
  await loadWallets().catch(sayProblem);
}

// --- the hot wallet demonstration ---
async function hotWallet() {
  if (!state.wallet) { say("Create or pick a wallet first."); return; }
  const count = Math.max(1, Math.min(2000, Number($("hot-count").value) || 1));
  const result = $("hot-result");
  const button = $("hot-wallet");
  button.disabled = true;
  result.className = "";
  try {
    const { data: before } = await api(`/api/v1/wallets/${state.wallet}`);
    let expected = toCents(before.balance);
    const amounts = Array.from({ length: count }, (_, i) => BigInt(1 + (i * 37) % 999));
    for (const cents of amounts) expected += cents;
    result.textContent = `Sending ${count} deposits at once…`;
    const started = performance.now();
    const answers = await Promise.allSettled(amounts.map((cents) =>
      api(`/api/v1/wallets/${state.wallet}/operation`, {
        method: "POST",
        body: { operationType: "DEPOSIT", amount: fromCents(cents) },
        headers: { "Idempotency-Key": crypto.randomUUID() },
      })));
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const failed = answers.filter((a) => a.status === "rejected").length;
    // Deposits are never refused: every one that was accepted lands. Wait for the queued ones.
    let balance = "";
    for (let i = 0; i < 50; i += 1) {
      balance = (await api(`/api/v1/wallets/${state.wallet}`)).data.balance;
      if (toCents(balance) === expected || failed) break;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    const exact = toCents(balance) === expected && !failed;
    result.className = exact ? "exact" : "off";
    result.textContent = exact
      ? `${count} deposits in ${seconds} s. Expected ${fromCents(expected)}, the balance is ${balance}: exact.`
      : `${failed} of ${count} deposits failed; expected ${fromCents(expected)}, the balance is ${balance}.`;
  } catch (error) { sayProblem(error); }
  button.disabled = false;
  await showWallet().catch(sayProblem);
}

// --- the live panel ---
function drawChart(canvas, series, colors) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const values = series.flat().filter((v) => v !== null);
  const top = Math.max(1, ...values);
  ctx.strokeStyle = "#c8c8c8";
  ctx.beginPath(); ctx.moveTo(0, height - 0.5); ctx.lineTo(width, height - 0.5); ctx.stroke();
  series.forEach((points, k) => {
    ctx.strokeStyle = colors[k];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let drawing = false;
    points.forEach((v, i) => {
      if (v === null) { drawing = false; return; }
      const x = (i / Math.max(1, points.length - 1)) * width;
      const y = height - 2 - (v / top) * (height - 6);
      if (drawing) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      drawing = true;
    });
    ctx.stroke();
  });
  ctx.fillStyle = "#4a4a4a";
  ctx.font = "11px system-ui";
  ctx.fillText(String(Math.round(top * 100) / 100), 2, 11);
}

function latest(series, key) {
  for (let i = series.length - 1; i >= 0; i -= 1) if (series[i][key] !== null) return series[i][key];
  return null;
}

async function refreshLive() {
  try {
    const { data } = await api("/api/live");
    const s = data.series.slice(0, -1); // the current second is still filling
    const pick = (key) => s.map((p) => p[key]);
    drawChart($("chart-ops"), [pick("answered"), pick("committed")], ["#0b57d0", "#c5221f"]);
    drawChart($("chart-latency"), [pick("p50_ms"), pick("p99_ms")], ["#0b57d0", "#c5221f"]);
    drawChart($("chart-batch"), [pick("mean_batch")], ["#0b57d0"]);
    drawChart($("chart-queued"), [pick("queued")], ["#0b57d0"]);
    const last = s[s.length - 1] || {};
    $("live-ops").textContent = `${last.answered || 0} / ${last.committed || 0}`;
    const p50 = latest(s, "p50_ms"); const p99 = latest(s, "p99_ms");
    $("live-latency").textContent = p50 === null ? "–" : `${p50} / ${p99}`;
    const batch = latest(s, "mean_batch");
    $("live-batch").textContent = batch === null ? "–" : String(batch);
    $("live-queued").textContent = String(latest(s, "queued") || 0);
    $("live-peak").textContent = String(Math.max(0, ...pick("answered")));
    const shards = latest(data.series, "queued_by_shard") || {};
    const busiest = Object.entries(shards).sort((a, b) => b[1] - a[1]).slice(0, 5);
    $("live-shards").textContent = busiest.length
      ? busiest.map(([shard, n]) => `shard ${shard}: ${n}`).join(", ") : "none queued";
  } catch (error) { /* the panel tries again at its next tick */ }
}

// --- start ---
document.addEventListener("DOMContentLoaded", async () => {
  $("auth-form").addEventListener("submit", (e) => { e.preventDefault(); signIn(false); });
  $("register").addEventListener("click", () => { if ($("auth-form").reportValidity()) signIn(true); });
  $("new-wallet").addEventListener("click", newWallet);
  $("wallet-select").addEventListener("change", (e) => { state.wallet = e.target.value; showWallet().catch(sayProblem); });
  $("operate-form").addEventListener("submit", operate);
  $("transfer-form").addEventListener("submit", transfer);
  $("hold-form").addEventListener("submit", placeHold);
  $("hot-wallet").addEventListener("click", hotWallet);
  refreshLive();
  setInterval(refreshLive, 1500);
  try {
    await loadWallets();
    showMain();
  } catch (error) {
    if (error instanceof Problem && error.status === 401) showAuth(); else sayProblem(error);
  }
});
