/*
 * sagad's page for operators: views over the admin API (sagad(8) ADMIN
 * API), chosen by the URL's fragment:
 *   #sagas?name=N&state=S&limit=L   saga instances, filtered
 *   #saga/ID                        one saga: timeline, steps, history, actions
 *   #dlq[/SUBSCRIPTION]             dead letters, replay
 *   #outbox                         the outbox backlog
 * The token (api.token_file) is asked once and kept in this tab's
 * sessionStorage; every API call sends it. The only writes are those
 * sagactl has: saga retry/abort and dead-letter replay, each confirmed
 * by a second click. All text from the API goes in as text, never HTML.
 */
"use strict";

(function () {
	var TOKEN_KEY = "sagad-token", REFRESH_MS = 5000;
	var status = null, refreshTimer = null, busy = false;

	function $(id) { return document.getElementById(id); }

	function node(tag, text, cls) {
		var e = document.createElement(tag);
		if (text !== undefined && text !== null)
			e.textContent = String(text);
		if (cls)
			e.className = cls;
		return e;
	}

	function link(href, text) {
		var a = node("a", text);
		a.href = href;
		return a;
	}

	function row(cells) {
		var tr = document.createElement("tr");
		cells.forEach(function (c) {
			var td = document.createElement("td");
			if (c instanceof Node)
				td.appendChild(c);
			else
				td.textContent = c === undefined || c === null ? "" : String(c);
			tr.appendChild(td);
		});
		return tr;
	}

	function clear(e) {
		while (e.firstChild)
			e.removeChild(e.firstChild);
		return e;
	}

	function when(at) {
		return at > 0 ? new Date(at * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "";
	}

	function say(text, bad) {
		var m = $("message");
		m.textContent = text || "";
		m.className = bad ? "error" : "";
	}

	/* ---- the API ---- */

	function AuthError() {}

	function api(method, path, body) {
		var headers = {}, token = sessionStorage.getItem(TOKEN_KEY);
		if (token)
			headers.Authorization = "Bearer " + token;
		if (body !== undefined)
			headers["Content-Type"] = "application/json";
		return fetch(path, { method: method, headers: headers, cache: "no-store",
			body: body === undefined ? undefined : JSON.stringify(body) })
			.then(function (r) {
				if (r.status === 401)
					throw new AuthError();
				return r.json().catch(function () { return {}; }).then(function (j) {
					if (!r.ok) {
						var err = new Error((j.error || r.status) + ": " + (j.message || r.statusText));
						err.status = r.status;
						throw err;
					}
					return j;
				});
			});
	}

	function failed(e) {
		if (e instanceof AuthError) {
			showLogin(sessionStorage.getItem(TOKEN_KEY) ? "The token was refused." : "");
			return;
		}
		say(e.message || String(e), true);
	}

	/* ---- views ---- */

	var VIEWS = ["login", "sagas", "saga", "dlq", "outbox"];

	function show(view) {
		VIEWS.forEach(function (v) { $("view-" + v).hidden = v !== view; });
		["sagas", "dlq", "outbox"].forEach(function (v) {
			$("nav-" + v).className = v === view || (view === "saga" && v === "sagas") ? "current" : "";
		});
	}

	function showLogin(why) {
		stopRefresh();
		show("login");
		$("login-error").textContent = why || "";
		$("token").focus();
	}

	function header(s) {
		var h = $("health"), b = s.broker || {}, st = s.store || {};
		$("service").textContent = s.service + " (" + s.version + ")";
		h.textContent = "broker " + b.link + (st.writable ? "" : ", store not writable") +
			(s.state === "running" ? "" : ", " + s.state);
		h.className = b.link === "up" && st.writable && s.state === "running" ? "ok" : "bad";
		$("forget").hidden = !sessionStorage.getItem(TOKEN_KEY);
	}

	function params(q) {
		var p = {};
		(q || "").split("&").forEach(function (kv) {
			var i = kv.indexOf("=");
			if (i > 0)
				p[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1));
		});
		return p;
	}

	function query(p) {
		return Object.keys(p).filter(function (k) { return p[k] !== ""; }).map(function (k) {
			return encodeURIComponent(k) + "=" + encodeURIComponent(p[k]);
		}).join("&");
	}

	function stepsText(steps) {
		return (steps || []).map(function (s) { return s.name + "=" + s.state; }).join(" ");
	}

	function viewSagas(p) {
		var names = $("filter-name"), now = Date.now() / 1000;
		if (names.options.length === 1)
			(status.sagas || []).forEach(function (s) {
				names.appendChild(node("option", s.name));
			});
		names.value = p.name || "";
		$("filter-state").value = p.state || "";
		$("filter-limit").value = p.limit || 100;
		return api("GET", "/v1/admin/sagas?" + query({ name: p.name || "", state: p.state || "",
			limit: p.limit || "" })).then(function (j) {
			var body = clear($("saga-table").tBodies[0]);
			j.sagas.forEach(function (s) {
				var end = s.finished_at > 0 ? s.finished_at : now;
				var tr = row([link("#saga/" + encodeURIComponent(s.id), s.id), s.saga,
					node("span", s.state, "state " + s.state), stepsText(s.steps),
					when(s.started_at), sagadTimeline.duration(end - s.started_at),
					node("code", s.trace_id || "")]);
				tr.dataset.id = s.id;
				body.appendChild(tr);
			});
			$("saga-empty").hidden = j.sagas.length > 0;
			show("sagas");
		});
	}

	/* A button that acts on its second click within five seconds. */
	function confirmButton(label, confirmLabel, act) {
		var b = node("button", label), armed = null;
		b.type = "button";
		b.addEventListener("click", function () {
			if (!armed) {
				b.textContent = confirmLabel;
				b.className = "armed";
				busy = true;
				armed = setTimeout(function () {
					armed = null;
					busy = false;
					b.textContent = label;
					b.className = "";
				}, 5000);
				return;
			}
			clearTimeout(armed);
			armed = null;
			busy = false;
			b.disabled = true;
			act().then(route, function (e) { b.disabled = false; failed(e); });
		});
		return b;
	}

	function sagaAction(id, what) {
		return api("POST", "/v1/admin/sagas/" + encodeURIComponent(id) + "/" + what).then(function () {
			say("saga " + id + ": " + what + " done");
		});
	}

	function instanceView(inst) {
		var div = node("div", null, "instance"), actions = node("p", null, "actions");
		var h = node("h3");
		h.appendChild(node("span", inst.saga + " "));
		h.appendChild(node("span", inst.state, "state " + inst.state));
		div.appendChild(h);
		var facts = [["mode", inst.mode], ["version", inst.version],
			["started", when(inst.started_at)],
			["updated", when(inst.updated_at)], ["finished", when(inst.finished_at)],
			["reason", inst.reason], ["trace id", inst.trace_id]];
		var dl = document.createElement("dl");
		facts.forEach(function (f) {
			if (!f[1])
				return;
			dl.appendChild(node("dt", f[0]));
			dl.appendChild(node("dd", f[1]));
		});
		div.appendChild(dl);
		if (inst.state === "failed")
			actions.appendChild(confirmButton("Retry", "Confirm retry", function () {
				return sagaAction(inst.id, "retry");
			}));
		if (inst.state === "running")
			actions.appendChild(confirmButton("Abort", "Confirm abort", function () {
				return sagaAction(inst.id, "abort");
			}));
		div.appendChild(actions);
		div.appendChild(node("h4", "Timeline"));
		var wrap = node("div", null, "timeline-wrap");
		wrap.appendChild(sagadTimeline.draw(inst, Date.now() / 1000));
		div.appendChild(wrap);
		div.appendChild(node("h4", "Steps"));
		var steps = node("table", null, "steps");
		steps.appendChild(row(["step", "state", "attempts", "compensation attempts"]));
		inst.steps.forEach(function (s) {
			steps.appendChild(row([s.name, s.state, s.attempts, s.compensate_attempts]));
		});
		div.appendChild(steps);
		div.appendChild(node("h4", "History"));
		var hist = node("table", null, "history");
		hist.appendChild(row(["at", "+", "", "what", "step", "message id", "detail"]));
		(inst.history || []).forEach(function (e) {
			hist.appendChild(row([when(e.at), sagadTimeline.duration(e.at - inst.started_at),
				e.dir, e.what, e.step, e.message_id, e.detail]));
		});
		div.appendChild(hist);
		return div;
	}

	function viewSaga(id) {
		return api("GET", "/v1/admin/sagas/" + encodeURIComponent(id)).then(function (j) {
			$("saga-id").textContent = id;
			var box = clear($("saga-instances"));
			j.instances.forEach(function (inst) { box.appendChild(instanceView(inst)); });
			show("saga");
		});
	}

	function replay(sub, ids) {
		var body = ids ? { message_ids: ids } : {};
		return api("POST", "/v1/admin/dlq/" + encodeURIComponent(sub) + "/replay", body)
			.then(function (j) { say(j.replayed + " dead letter(s) of " + sub + " replayed"); });
	}

	function viewDlq(sub) {
		return api("GET", "/v1/admin/subscriptions").then(function (j) {
			var body = clear($("sub-table").tBodies[0]);
			j.subscriptions.forEach(function (s) {
				body.appendChild(row([link("#dlq/" + encodeURIComponent(s.name), s.name), s.queue,
					s.deliver, s.backlog, s.dead_letters, s.circuit]));
			});
			$("dlq-detail").hidden = !sub;
			if (!sub) {
				show("dlq");
				return;
			}
			return api("GET", "/v1/admin/dlq/" + encodeURIComponent(sub) + "?limit=1000").then(function (d) {
				$("dlq-sub").textContent = sub;
				$("dlq-count").textContent = d.count + " dead letter(s)" +
					(d.count > d.messages.length ? ", the oldest " + d.messages.length + " shown" : "");
				var old = $("replay-all"), all = confirmButton("Replay all", "Confirm: replay all", function () {
					return replay(sub, null);
				});
				all.id = "replay-all";
				all.disabled = d.count === 0;
				old.parentNode.replaceChild(all, old);
				var tb = clear($("dlq-table").tBodies[0]);
				d.messages.forEach(function (m) {
					var b = node("button", "Replay");
					b.type = "button";
					b.addEventListener("click", function () {
						b.disabled = true;
						replay(sub, [m.message_id]).then(route, function (e) { b.disabled = false; failed(e); });
					});
					var tr = row([m.message_id, m.routing_key, m.reason, m.attempts, m.last_error,
						when(m.dead_at), node("code", m.trace_id || ""), b]);
					tr.dataset.messageId = m.message_id;
					tb.appendChild(tr);
				});
				show("dlq");
			});
		});
	}

	function viewOutbox() {
		return api("GET", "/v1/admin/outbox?limit=1000").then(function (j) {
			$("outbox-summary").textContent = j.pending + " message(s) waiting, " + j.inflight +
				" awaiting the broker's confirm, oldest " +
				sagadTimeline.duration(j.oldest_age_seconds) + " old" +
				(j.pending > j.messages.length ? "; the first " + j.messages.length + " shown" : "");
			var tb = clear($("outbox-table").tBodies[0]);
			j.messages.forEach(function (m) {
				tb.appendChild(row([m.seq, m.message_id, m.exchange, m.routing_key, m.attempts,
					sagadTimeline.duration(m.age_seconds), m.last_error, node("code", m.trace_id || "")]));
			});
			show("outbox");
		});
	}

	/* ---- routing and refresh ---- */

	function route() {
		var hash = location.hash.replace(/^#/, ""), q = hash.indexOf("?");
		var path = q < 0 ? hash : hash.slice(0, q), p = params(q < 0 ? "" : hash.slice(q + 1));
		var done;
		stopRefresh();
		done = api("GET", "/v1/admin/status").then(function (s) {
			status = s;
			header(s);
			if (path.indexOf("saga/") === 0)
				return viewSaga(decodeURIComponent(path.slice(5)));
			if (path === "dlq" || path.indexOf("dlq/") === 0)
				return viewDlq(path.length > 4 ? decodeURIComponent(path.slice(4)) : null);
			if (path === "outbox")
				return viewOutbox();
			return viewSagas(p);
		});
		return done.then(function () {
			$("updated").textContent = "updated " + new Date().toLocaleTimeString();
			startRefresh();
		}, failed);
	}

	function startRefresh() {
		refreshTimer = setTimeout(function () {
			if (busy || document.hidden)
				startRefresh();
			else
				route();
		}, REFRESH_MS);
	}

	function stopRefresh() {
		if (refreshTimer)
			clearTimeout(refreshTimer);
		refreshTimer = null;
	}

	$("login-form").addEventListener("submit", function (ev) {
		ev.preventDefault();
		sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
		$("token").value = "";
		say("");
		route();
	});
	$("forget").addEventListener("click", function () {
		sessionStorage.removeItem(TOKEN_KEY);
		showLogin("");
	});
	$("saga-filter").addEventListener("submit", function (ev) {
		ev.preventDefault();
		var q = query({ name: $("filter-name").value, state: $("filter-state").value,
			limit: $("filter-limit").value === "100" ? "" : $("filter-limit").value });
		location.hash = "#sagas" + (q ? "?" + q : "");
	});
	window.addEventListener("hashchange", function () { say(""); route(); });
	route();
})();
