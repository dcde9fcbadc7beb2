#include <assert.h>
#include <stdio.h>
#include <string.h>

#include "calc.h"

static void check(const char *input, const char *expected) {
    char buf[128];
    strcpy(buf, input);
    reverse_words(buf);
    if (strcmp(buf, expected) != 0) {
        fprintf(stderr, "reverse_words(\"%s\") gave \"%s\", expected \"%s\"\n", input, buf, expected);
    }
    assert(strcmp(buf, expected) == 0);
}

int main(void) {
    check("the sky is blue", "blue is sky the");
    check("hello world", "world hello");
    check("one", "one");
    check("", "");
    check("a bc def", "def bc a");
    check("kiln builds code", "code builds kiln");
    puts("all tests passed");
    return 0;
}
