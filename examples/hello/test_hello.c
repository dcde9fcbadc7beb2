// Tests for hello.c: compiled with -DTESTING so that main() is left out.
#include <stdio.h>
#include <string.h>

int greeting(char *buf, size_t size, const char *name);

static int failures = 0;

static void expect(const char *what, const char *got, const char *want) {
    if (strcmp(got, want) != 0) {
        fprintf(stderr, "FAIL %s: got \"%s\", want \"%s\"\n", what, got, want);
        failures++;
    } else {
        printf("ok   %s\n", what);
    }
}

int main(void) {
    char buf[64];
    greeting(buf, sizeof buf, "world");
    expect("greets by name", buf, "hello, world!");
    greeting(buf, 8, "truncated");
    expect("never overflows", buf, "hello, ");
    printf("%d failure(s)\n", failures);
    return failures == 0 ? 0 : 1;
}
