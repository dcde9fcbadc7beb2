#include <assert.h>
#include <limits.h>
#include <stdio.h>

#include "calc.h"

static void ok(const char *s, int expected) {
    int v = 12345;
    int rc = parse_int(s, &v);
    if (rc != 0 || v != expected) {
        fprintf(stderr, "parse_int(\"%s\") gave rc=%d value=%d, expected rc=0 value=%d\n", s, rc, v, expected);
    }
    assert(rc == 0 && v == expected);
}

static void bad(const char *s) {
    int v = 12345;
    int rc = parse_int(s, &v);
    if (rc != -1 || v != 12345) {
        fprintf(stderr, "parse_int(\"%s\") gave rc=%d value=%d, expected rc=-1 and value unchanged\n", s, rc, v);
    }
    assert(rc == -1 && v == 12345);
}

int main(void) {
    ok("0", 0);
    ok("42", 42);
    ok("-17", -17);
    ok("+5", 5);
    ok("007", 7);
    ok("2147483647", INT_MAX);
    ok("-2147483648", INT_MIN);
    bad("");
    bad("-");
    bad("+");
    bad("12a");
    bad(" 12");
    bad("1 2");
    bad("2147483648");
    bad("-2147483649");
    bad("99999999999999999999");
    puts("all tests passed");
    return 0;
}
