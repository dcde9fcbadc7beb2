#ifndef CALC_H
#define CALC_H

/* Reverses the order of the words of s in place. Words are separated by single spaces and
 * s has no leading or trailing space: "the sky is blue" becomes "blue is sky the". An empty
 * string stays empty; a single word is unchanged. */
void reverse_words(char *s);

#endif
