/* Unit tests for src/webui.c: which names and types the page serves. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "webui.h"

static void
test_names(void **state)
{
	static const char *const ok[] = { "index.html", "app.js", "style.css", "a_b-c.1.svg",
		"x" };
	static const char *const bad[] = { "", ".", "..", ".hidden.js", "../conf.js", "a/b.js",
		"a\\b.js", "a b.js", "a%2fb.js", "caf\xc3\xa9.js", "a;b.js",
		"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.js" };
	size_t i;

	(void)state;
	for (i = 0; i < sizeof ok / sizeof ok[0]; i++)
		assert_true(webui_name_ok(ok[i]));
	for (i = 0; i < sizeof bad / sizeof bad[0]; i++)
		assert_false(webui_name_ok(bad[i]));
}

static void
test_types(void **state)
{
	(void)state;
	assert_string_equal(webui_content_type("index.html"), "text/html; charset=utf-8");
	assert_string_equal(webui_content_type("app.js"), "text/javascript; charset=utf-8");
	assert_string_equal(webui_content_type("style.css"), "text/css; charset=utf-8");
	assert_string_equal(webui_content_type("logo.svg"), "image/svg+xml");
	assert_string_equal(webui_content_type("shot.png"), "image/png");
	/* Nothing else is served: not the store, not a configuration. */
	assert_null(webui_content_type("sagad.db"));
	assert_null(webui_content_type("sagad.conf"));
	assert_null(webui_content_type("html"));
	assert_null(webui_content_type(".js"));
	assert_null(webui_content_type("app.js.bak"));
	assert_null(webui_content_type("Makefile"));
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_names),
		cmocka_unit_test(test_types),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
