// A build that fails on purpose, to show what a compiler error looks like in kiln.
#include <stdio.h>

int main(void) {
    printf("this line is missing its semicolon\n")
    return 0;
}
