/*
 * A saga instance's history drawn as a timeline (SVG): one row per command
 * or compensation, a bar from the moment it was sent to its reply (or to
 * its timeout, or to now while it waits), and marks for the instance's
 * state changes, timers and operators' actions. Rows come in the order
 * things happened, so compensations appear in the reverse order of their
 * steps, as sagad runs them.
 */
"use strict";

var sagadTimeline = (function () {
	var SVG = "http://www.w3.org/2000/svg";
	var LABEL = 190, WIDTH = 860, ROW = 22, TOP = 26, PAD = 8, RIGHT = 120;

	/*
	 * The history (oldest first) as bars and marks. end: when open bars
	 * stop. oneWay: the names of notification steps, whose messages (and
	 * compensations) are not awaited: marks, not bars.
	 */
	function bars(history, end, oneWay) {
		var out = [], marks = [], open = {};

		function close(key, at, result) {
			var b = open[key];
			if (!b)
				return false;
			b.end = at;
			b.result = result;
			delete open[key];
			return true;
		}
		history.forEach(function (h) {
			var cmd = "command " + h.step, comp = "compensate " + h.step;
			if (h.dir === "out" && /^compensate/.test(h.what) && oneWay[h.step]) {
				marks.push(h);
			} else if (h.dir === "out" && (h.what === "command" || /^compensate(#\d+)?$/.test(h.what))) {
				/* compensate#N: a compensation by event, sent again as a new message */
				var key = h.what === "command" ? cmd : comp;
				close(key, h.at, "sent again");
				open[key] = { kind: key === cmd ? "command" : "compensate", step: h.step,
					start: h.at, end: null,
					result: "waiting", message_id: h.message_id, to: h.detail };
				out.push(open[key]);
			} else if (h.dir === "in" && (h.what === "success" || h.what === "failure")) {
				if (!close(cmd, h.at, h.what))	/* choreographed: an event, no command */
					out.push({ kind: "event", step: h.step, start: h.at, end: h.at,
						result: h.what, message_id: h.message_id });
			} else if (h.dir === "in" && /^compensation (success|failure)$/.test(h.what)) {
				close(comp, h.at, h.what.slice(13));
			} else if (h.dir === "timer" && /^step timeout/.test(h.what)) {
				close(cmd, h.at, "timeout");
				marks.push(h);
			} else if (h.dir !== "in" || h.what === "start" || /ignored$/.test(h.what)) {
				marks.push(h);
			}
		});
		out.forEach(function (b) {
			if (b.end === null)
				b.end = end;
		});
		return { bars: out, marks: marks };
	}

	function el(name, attrs, text) {
		var e = document.createElementNS(SVG, name);
		Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
		if (text !== undefined)
			e.textContent = text;
		return e;
	}

	function duration(s) {
		if (s < 1)
			return Math.round(s * 1000) + " ms";
		if (s < 60)
			return s.toFixed(2) + " s";
		return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
	}

	function markLabel(m) {
		if (m.dir === "out" && m.what === "notification")
			return "notify " + m.step;
		if (m.dir === "out" && m.what === "compensate")
			return "undo " + m.step;
		if (m.dir === "out")
			return "event " + m.what;
		if (m.dir === "step")
			return m.step + ": " + m.what.replace(/:.*/, "");
		return m.what.replace(/:.*/, "");
	}

	function resultClass(b) {
		if (b.result === "success")
			return "ok";
		if (b.result === "waiting")
			return "waiting";
		if (b.result === "sent again")
			return "resent";
		return "bad";	/* failure, timeout */
	}

	/* The SVG of one instance (the admin API's saga JSON with history). */
	function draw(inst, now) {
		var hist = (inst.history || []).slice().sort(function (a, b) { return a.at - b.at; });
		var t0 = inst.started_at, end = inst.finished_at > 0 ? inst.finished_at : now;
		var oneWay = {};
		(inst.steps || []).forEach(function (s) {
			if (s.kind === "notification")
				oneWay[s.name] = true;
		});
		var r = bars(hist, end, oneWay), span = Math.max(end - t0, 0.001);
		var height = TOP + ROW * r.bars.length + ROW * 1.5 + PAD;
		var full = LABEL + WIDTH + PAD * 2 + RIGHT;	/* RIGHT: room for the last labels */
		var svg = el("svg", { "class": "timeline", width: full, height: height,
			viewBox: "0 0 " + full + " " + height });
		function x(at) { return LABEL + PAD + Math.max(0, at - t0) / span * WIDTH; }

		for (var i = 0; i <= 4; i++) {
			var tx = LABEL + PAD + WIDTH * i / 4;
			svg.appendChild(el("line", { x1: tx, x2: tx, y1: TOP - 6, y2: height - PAD, "class": "tick" }));
			svg.appendChild(el("text", { x: tx, y: TOP - 10, "class": "tick-label",
				"text-anchor": i === 4 ? "end" : (i === 0 ? "start" : "middle") },
				duration(span * i / 4)));
		}
		r.bars.forEach(function (b, i) {
			var y = TOP + i * ROW, x0 = x(b.start), w = Math.max(x(b.end) - x0, 2);
			var g = el("g", { "class": "bar " + b.kind + " " + resultClass(b),
				"data-kind": b.kind, "data-step": b.step, "data-result": b.result });
			var what = b.kind === "event" ? "event " + b.step : b.kind + " " + b.step;
			g.appendChild(el("title", {}, what + ": " + b.result +
				(b.kind === "event" ? "" : ", " + duration(b.end - b.start)) +
				(b.message_id ? "\nmessage " + b.message_id : "") + (b.to ? "\nto " + b.to : "")));
			g.appendChild(el("text", { x: LABEL, y: y + ROW * 0.68, "text-anchor": "end",
				"class": "row-label" }, what));
			g.appendChild(el("rect", { x: x0, y: y + 3, width: w, height: ROW - 6, rx: 3 }));
			if (b.kind !== "event")
				g.appendChild(el("text", { x: x0 + w + 4,
					y: y + ROW * 0.68, "class": "bar-label" },
					duration(b.end - b.start) + (b.result === "success" ? "" : " " + b.result)));
			svg.appendChild(g);
		});
		r.marks.forEach(function (m, i) {
			var mx = x(m.at), y = TOP + ROW * r.bars.length;
			var g = el("g", { "class": "mark " + m.dir, "data-what": m.what });
			g.appendChild(el("title", {}, m.dir + ": " + m.what + (m.step ? " " + m.step : "") +
				(m.detail ? " (" + m.detail + ")" : "") + " at +" + duration(m.at - t0)));
			g.appendChild(el("line", { x1: mx, x2: mx, y1: TOP - 4, y2: y + 4 }));
			g.appendChild(el("text", { x: mx, y: y + ROW * (0.9 + (i % 2) * 0.5),
				"text-anchor": mx > LABEL + WIDTH * 0.8 ? "end" : "start" },
				markLabel(m)));
			svg.appendChild(g);
		});
		return svg;
	}

	return { bars: bars, draw: draw, duration: duration };
})();
