// The kiln demo project: a tiny C program and its test, built and run in the sandbox.
#include <stdio.h>
#include <string.h>

// greeting writes "hello, <name>!" into buf (at most size bytes, NUL included).
int greeting(char *buf, size_t size, const char *name) {
    return snprintf(buf, size, "hello, %s!", name);
}

#ifndef TESTING
int main(int argc, char **argv) {
    char buf[128];
    greeting(buf, sizeof buf, argc > 1 ? argv[1] : "kiln");
    puts(buf);
    return 0;
}
#endif
